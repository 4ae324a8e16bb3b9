from .metronome import main

raise SystemExit(main())
