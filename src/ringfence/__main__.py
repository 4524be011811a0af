from __future__ import annotations

from ringfence.cli import main

raise SystemExit(main())
