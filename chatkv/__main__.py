from chatkv.cli import main

if __name__ == "__main__":  # not when multiprocessing imports it in the engine's child process
    raise SystemExit(main())
