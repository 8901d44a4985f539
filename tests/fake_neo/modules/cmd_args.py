"""Neo's command line: the fake A1111's flags plus Neo's `--cpu` ("Use the CPU for everything", N `backend/args.py:87`,
which the WebUI's parser shares)."""

import fake_neo_overlay as _overlay

_overlay.extend(globals(), "modules/cmd_args.py", root=_overlay.FAKE_A1111)
parser.add_argument("--cpu", action="store_true", help="Use the CPU for everything (slow)")  # type: ignore[name-defined]  # noqa: F821
