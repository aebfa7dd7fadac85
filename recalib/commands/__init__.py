"""One module per ``recalib`` subcommand: ``add_parser(parser)`` and ``main(args) -> int``.

Modules import their heavy dependencies (torch, uvicorn) inside ``main`` so that building the
parser stays fast and torch-free.
"""
