from tq_ops.eval.cli import main

raise SystemExit(main())
