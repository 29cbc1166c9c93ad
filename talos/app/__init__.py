"""The application layer: command-line flags, run folders, script stages and sweeps over the typed library.

Everything that reads an ``argparse.Namespace`` or a command line lives here; the core ``talos`` modules take
typed objects only.
"""
