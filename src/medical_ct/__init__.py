"""medical_ct: continuous training of a MedNIST medical image classifier."""

__version__ = "0.1.0"
