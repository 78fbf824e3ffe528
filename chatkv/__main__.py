from chatkv.cli import main

raise SystemExit(main())
