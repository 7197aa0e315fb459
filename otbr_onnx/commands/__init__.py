"""What each command of the command line does once its options are parsed: one function per
command (``scan.scan_command``, ``clean.clean_command``, ...) that checks the paths, runs the
library, writes the outputs, prints the command's view and returns the exit code.

``otbr_onnx.cli`` parses and calls these; it imports them only when a command runs, so that
``otbr-onnx --help`` never loads torch.
"""
