from taskandgo.node.cli import main

raise SystemExit(main())
