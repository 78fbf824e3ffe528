#!/usr/bin/env bash
# Real-terminal check: run `chatkv launch` inside tmux, type a message, read the reply off the screen, quit.
#
# usage: scripts/tmux_check.sh [MODEL_DIR]
#        scripts/tmux_check.sh --first-launch
#   MODEL_DIR        the converted model folder passed to --model (default: chatkv's own lookup of SmolLM2)
#   --first-launch   a machine's very first launch: an empty data folder (the model is fetched, converted and
#                    quantized) and an empty kernel build folder (TORCH_EXTENSIONS_DIR); the message is typed
#                    while the model still loads, and nothing in the theme's error colour may ever be on screen
#   CHATKV           the chatkv command to run (default: .venv/bin/chatkv in this repository, else chatkv on PATH)
#   CHATKV_CHECK_KEEP=1   keep the temporary data folder and print where it is
#
# Textual's pilot tests drive the App without a terminal; this drives it through a real one (tmux), so it
# also covers terminal setup, key decoding and a clean exit that gives the terminal back.
# Exit status: 0 when the reply appeared and chatkv quit with status 0; 1 otherwise, with the screen printed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
first_launch=0
if [[ ${1:-} == --first-launch ]]; then first_launch=1; shift; fi
model_dir=${1:-}
chatkv=${CHATKV:-}
if [[ -z $chatkv ]]; then
    if [[ -x $repo/.venv/bin/chatkv ]]; then chatkv=$repo/.venv/bin/chatkv; else chatkv=chatkv; fi
fi
command -v tmux >/dev/null || { echo "tmux_check: tmux is not installed" >&2; exit 2; }

WIDTH=160
HEIGHT=50
STATS_PANEL_WIDTH=40    # the chat column is what is left of the screen beside the stats panel
MESSAGE="Name three colours."
UI_READY="palette"      # Textual's footer shows the command palette key once the App is drawn
REPLY_DONE='[0-9]+ tokens? · TTFT'   # the footer chatkv writes under a finished reply
LOAD_TIMEOUT_S=300      # the first launch on a machine fetches and converts the model before the chat shows
REPLY_TIMEOUT_S=120
FIRST_REPLY_TIMEOUT_S=420   # ... and then quantizes it and builds the kernels before the first reply
# On a first launch nothing may show in red: chatkv-dark's error colour (#e06c75) and the tints Textual derives
# from it (error text, toasts). A colour counts as red when red leads green and blue by 60 and those two are close
# (the theme's amber accent has green well above blue).
EXIT_TIMEOUT_S=30

# A private tmux server (-L), so the check never touches the user's own tmux sessions.
socket="chatkv-check-$$"
session="chatkv"
home=$(mktemp -d "${TMPDIR:-/tmp}/chatkv-check.XXXXXX")
tmux_() { tmux -L "$socket" "$@"; }

cleanup() {
    tmux_ kill-server 2>/dev/null || true
    if [[ ${CHATKV_CHECK_KEEP:-0} == 1 ]]; then echo "tmux_check: data kept in $home" >&2; else rm -rf "$home"; fi
}
trap cleanup EXIT

screen() { tmux_ capture-pane -p -t "$session" 2>/dev/null || true; }
# the screen with its colours (SGR sequences), to see whether anything is drawn in the error colour
coloured_screen() { tmux_ capture-pane -e -p -t "$session" 2>/dev/null || true; }

fail() {
    echo "tmux_check: FAILED: $1" >&2
    echo "----- screen -----" >&2
    if [[ -n ${last_screen:-} ]]; then echo "$last_screen" >&2; else screen >&2; fi
    exit 1
}

# no_red: on a first launch nothing may ever show in the error colour (a failed load, a refused message)
no_red() {
    (( first_launch )) || return 0
    local red
    red=$(coloured_screen | grep -Eo '[34]8;2;[0-9]+;[0-9]+;[0-9]+' | sort -u | awk -F';' '
        { r = $3; g = $4; b = $5; d = g - b; if (d < 0) d = -d; if (r > g + 60 && r > b + 60 && d < 30) print r ";" g ";" b }' || true)
    if [[ -n $red ]]; then last_screen=$(screen); fail "something on screen is red ($(tr '\n' ' ' <<<"$red"))"; fi
}

# wait_for PATTERN TIMEOUT WHAT: poll the screen until the extended regex PATTERN shows up.
wait_for() {
    local pattern=$1 timeout=$2 what=$3 deadline=$((SECONDS + $2))
    while (( SECONDS < deadline )); do
        last_screen=$(screen)
        no_red
        if grep -Eq -- "$pattern" <<<"$last_screen"; then return 0; fi
        [[ -e $home/exit_status ]] && fail "chatkv exited (status $(cat "$home/exit_status")) while waiting for $what"
        sleep 0.5
    done
    fail "no $what after ${timeout} s"
}

launch=(env "CHATKV_HOME=$home" COLORTERM=truecolor)
(( first_launch )) && launch+=("TORCH_EXTENSIONS_DIR=$home/torch_extensions")
launch+=("$chatkv" launch --data-dir "$home" --max-new-tokens 24 --theme chatkv-dark)
[[ -n $model_dir ]] && launch+=(--model "$model_dir")
# The pane's command records chatkv's exit status, since the pane (and its session) closes when it ends.
# stderr stays on the pane: Textual draws the UI there.
printf -v quoted '%q ' "${launch[@]}"
tmux_ new-session -d -s "$session" -x "$WIDTH" -y "$HEIGHT" "$quoted; echo \$? > $(printf %q "$home/exit_status")"

wait_for "$UI_READY" "$LOAD_TIMEOUT_S" "chat screen"
echo "tmux_check: chat screen is up"

tmux_ send-keys -t "$session" -l "$MESSAGE"
wait_for "$MESSAGE" 10 "typed message on screen"
tmux_ send-keys -t "$session" Enter
if (( first_launch )); then
    grep -q " ready (" <<<"$last_screen" && fail "the model was ready before the message was sent: nothing tested a message typed during the load"
    wait_for "$REPLY_DONE" "$FIRST_REPLY_TIMEOUT_S" "finished reply"
else
    wait_for "$REPLY_DONE" "$REPLY_TIMEOUT_S" "finished reply"
fi

# The reply is the text between the message and the reply's footer, in the chat column.
chat_column=$((WIDTH - STATS_PANEL_WIDTH - 2))
reply=$(cut -c "1-$chat_column" <<<"$last_screen" | awk -v message="$MESSAGE" -v done="$REPLY_DONE" '
    index($0, message) { inside = 1; next }
    inside && $0 ~ done { exit }
    inside { gsub(/[│┃▌▎▊█╭╮╰╯─]/, ""); gsub(/^ +| +$/, ""); if (length($0)) print }')
grep -q '[[:alnum:]]' <<<"$reply" || fail "the reply on screen has no text"
echo "tmux_check: reply on screen:"
sed 's/^/    /' <<<"$reply"

tmux_ send-keys -t "$session" C-q
deadline=$((SECONDS + EXIT_TIMEOUT_S))
until [[ -s $home/exit_status ]]; do
    (( SECONDS < deadline )) || fail "chatkv did not quit within ${EXIT_TIMEOUT_S} s of Ctrl+Q"
    sleep 0.5
done
status=$(cat "$home/exit_status")
[[ $status == 0 ]] || fail "chatkv exited with status $status"
sleep 0.5
if tmux_ has-session -t "$session" 2>/dev/null; then fail "the tmux session is still open after chatkv quit"; fi
echo "tmux_check: chatkv quit cleanly (status 0)"
