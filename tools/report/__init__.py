"""The reproduction report (docs/results.md), written by ``tools/make_report.py``.

One module a purpose, read in the order the report is made:

- :mod:`.runs` reads the run folders and the results files, and checks that the runs pair up;
- :mod:`.corpus` what the runs trained on (documents, tokens, the split, chapter names);
- :mod:`.facts` turns them and this machine into the plain facts the text states
  (:class:`.facts.Facts`);
- :mod:`.stats` the seed statistics and the rule-based reading of a paired difference;
- :mod:`.text` how numbers are written;
- :mod:`.paper` what the paper reports, quoted, and what is read from its presets;
- :mod:`.figures` the figures of the NITP loss phases and of the probe batch's geometry;
- :mod:`.command` the command line that trains the runs' config again;
- :mod:`.sections` one module a section of the report, each with one ``render``;
- :mod:`.build` composes them.

``tools/make_report.py`` loads the package from its folder (tools/ is a folder of scripts, not
on the module path), so its modules import each other relatively.
"""

from .build import build_report
from .runs import common_config

__all__ = ["build_report", "common_config"]
