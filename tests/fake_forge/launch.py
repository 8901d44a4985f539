"""Top-level `launch` as extensions' install.py scripts import it (Forge keeps A1111's `launch_utils` helpers)."""

from modules import launch_utils

args = launch_utils.args
python = launch_utils.python
git = launch_utils.git
index_url = launch_utils.index_url
dir_repos = launch_utils.dir_repos
commit_hash = launch_utils.commit_hash
git_tag = launch_utils.git_tag
run = launch_utils.run
is_installed = launch_utils.is_installed
run_pip = launch_utils.run_pip
run_python = launch_utils.run_python
run_extension_installer = launch_utils.run_extension_installer
