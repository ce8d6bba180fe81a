"""Evaluation of generated images beyond the Fréchet distance (which is fastcm.fid's alone): the Classification
Accuracy Score (CAS) and the real / synthetic / real + synthetic protocol, and the report writers."""
from .cas import JUDGES, cas_protocol, classification_accuracy
from .report import plot_training_curves, prepare_out_dir, save_samples_npz, write_json

__all__ = ["JUDGES", "cas_protocol", "classification_accuracy", "plot_training_curves", "prepare_out_dir",
           "save_samples_npz", "write_json"]
