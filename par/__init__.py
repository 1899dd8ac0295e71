"""PAR, the Pixell Agent Runtime: many Python agents on one VM, each in its own venv and
systemd unit."""

__version__ = "0.2.0"
