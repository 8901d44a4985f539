import os

from modules import paths


def preload(parser):  # type: ignore[no-untyped-def]
    parser.add_argument("--lora-dir", type=str, help="Path to directory with Lora networks.",
                        default=os.path.join(paths.models_path, "Lora"))
    parser.add_argument("--lyco-dir-backcompat", type=str, help="Path to directory with LyCORIS networks.",
                        default=os.path.join(paths.models_path, "LyCORIS"))
