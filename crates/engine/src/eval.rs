//! OOD evaluation: metrics (AUROC, FPR@95, AUPR) and baseline detectors (MSP, energy, max-logit, KNN, ViM).
