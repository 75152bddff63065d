"""Where stas's shipped files live: the Hydra config tree and the experiments beside the package."""

from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_DIR / "conf"
EXPERIMENTS_DIR = REPO_DIR / "experiments"
