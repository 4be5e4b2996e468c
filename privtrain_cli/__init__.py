"""The ``privtrain`` command line: one thin module per command, imported only when that command runs.

``privtrain_cli.main`` holds the command table (name, one-line help, module). ``privtrain --help`` and the
parsing of every command other than the one given import nothing but argparse, so light commands (``budget``,
``report``, ``--help``) start without loading TensorFlow; each command module imports the layers it needs
(pipeline/, dp_training/, federated/, serving/, encrypted_serving/, simulations/) inside its functions.
"""
