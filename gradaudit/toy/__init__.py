"""The embedded default (the top floor): generated image–text corpora (``corpora.py``), tokenizers and the
vision-language models trained here (``tokenizers.py``, ``models.py``), test-size models of every family
(``tiny.py``), the scenarios' members, non-members and models (``scenarios.py``), and the demo
(``python -m gradaudit.toy.demo``, which ``make demo`` runs). Tests, benchmarks and the demo all use it."""
