"""The digits demo application: the built-in task, the end-to-end pipeline and the walkthrough.

This package sits on top of the library (`transformers_bard.models`, `.trainer`, `.conversion`) and is imported only by
the command line, on demand; nothing in the library imports it. Modules:

- `digits`: the handwritten-digit grid task (UCI digits, shipped), its shipped autoregressive source and the one
  evaluation loop that scores both AR and BARD decoding;
- `pipeline`: `transformers-bard demo`, conversion -> progressive block merging -> distillation -> evaluation;
- `walkthrough`: `transformers-bard walkthrough`, a seconds-long tour of conversion, loading and `generate`.
"""
