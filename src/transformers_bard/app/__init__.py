"""See BARD decode: the trace replay of `transformers-bard generate --show-steps` and the Gradio app of
`transformers-bard app` (issue 14).

`trace_view` (pure rendering, no heavy imports), `terminal` (the CLI's step view), `runner` (model choice and timed
decodes) and `gradio_app` (needs the optional extra `app`). Nothing here is imported by the library itself; import the
submodules directly.
"""
