"""Research scripts outside the package the services import (as Cornac keeps `examples/`): each runs
the package's models and evaluation on a question of its own and writes a report under reports/."""
