import sys

from bench.run import main
from utils import exit_status

sys.exit(exit_status(main))
