from modules.paths_internal import (  # noqa: F401
    data_path,
    extensions_builtin_dir,
    extensions_dir,
    models_path,
    script_path,
    sd_configs_path,
    sd_default_config,
    sd_model_file,
)

paths: dict[str, str] = {}
