"""Evaluation of generated images: Fréchet distance in a digits-classifier / pixel / Inception feature space,
Classification Accuracy Score (CAS) and the real / synthetic / real + synthetic protocol, and report writers."""
from .cas import JUDGES, cas_protocol, classification_accuracy
from .digits_net import SmallCNN, accuracy, cache_dir, feature_network, train_classifier
from .features import (FEATURES, compute_features, digits_feature_network, feature_extractor, frechet,
                       gaussian_stats, load_stats, save_stats, stats_of)
from .report import plot_training_curves, prepare_out_dir, save_samples_npz, write_json

__all__ = ["JUDGES", "FEATURES", "SmallCNN", "accuracy", "cache_dir", "cas_protocol", "classification_accuracy",
           "compute_features", "digits_feature_network", "feature_extractor", "feature_network", "frechet",
           "gaussian_stats", "load_stats", "plot_training_curves", "prepare_out_dir", "save_samples_npz",
           "save_stats", "stats_of", "train_classifier", "write_json"]
