"""The command line, and the only part of the package that parses arguments.

``common`` is what every command shares (parser class, bounded argparse types, the name
the user ran, errors to exit codes); one module per command (``fit``, ``evaluate``,
``predict``, ``export``, ``serve``, ``tutorial``, ``bench``) builds its parser and calls
the library. A command imports the library (and so TensorFlow) only after its arguments
are parsed: ``--help`` and a usage error answer without loading TensorFlow.
"""
