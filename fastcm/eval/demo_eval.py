"""The demo's metrics of one set of samples against the real digits test split.

Three Fréchet distances, because a loss that optimises a feature space improves that space by construction (the
FD-loss authors warn of exactly this for Inception FID): ``fd_features`` in the 64-d space of the digits CNN that
the FD stage trains against (SmallCNN), ``fd_heldout`` in the 48-d space of the held-out judge (HeldOutCNN: another
architecture and seed, trained on the same split, never used in training) and ``fd_pixels`` in raw pixels (no
network). The FD stage is judged by the held-out space; CAS and label agreement come beside them.
"""
import torch


class DemoEvaluator:
    """``ev(x, y)`` -> the metrics of images x (N, 1, 8, 8) in [-1, 1] with labels y; the real-data statistics are
    computed once here."""

    def __init__(self, feature_net, train, test, judge: str, seed: int, heldout=None):
        from fastcm.fid import DigitsFeatures, PixelFeatures

        self.net, self.judge, self.seed = feature_net, judge, seed
        self.x_train, self.y_train = train.get_batch(torch.arange(len(train)))
        self.x_test, self.y_test = test.get_batch(torch.arange(len(test)))
        self.features, self.pixels = DigitsFeatures(feature_net), PixelFeatures()
        self.heldout = None if heldout is None else DigitsFeatures(heldout, "digits-heldout")
        self.test_feat, self.test_pix = self.stats(self.x_test), self.stats(self.x_test, self.pixels)
        self.test_held = None if heldout is None else self.stats(self.x_test, self.heldout)
        self.train_feat = self.stats(self.x_train)
        self.heldout_info, self.eval_stats, self.cache = None, None, None

    def save_test_stats(self, out):
        """The test split's digits-feature statistics as the trainers' --eval-stats file (in out)."""
        self.test_feat.features = "digits"
        return self.test_feat.save(out / "eval-reference-digits-test.npz", overwrite=True)

    def stats(self, x, features=None):
        """FeatureStats of images x in [-1, 1] (digits-CNN features unless ``features`` is given)."""
        from fastcm.fid import compute_stats

        return compute_stats(x, features or self.features, batch_size=500)

    def fd_features(self, x) -> float:
        """Feature FD of images x to the real test split (fastcm.fid.fid on the sampler's output)."""
        from fastcm.fid import fid

        return fid(x, self.test_feat, features=self.features, batch_size=500)

    def __call__(self, x, y) -> dict:
        from fastcm.eval.cas import classification_accuracy
        from fastcm.fid import fid
        from fastcm.fid.digits_net import predict

        cas = classification_accuracy(x, y, self.x_test, self.y_test, judge=self.judge, seed=self.seed,
                                      num_classes=10)
        out = {"fd_features": self.fd_features(x),
               "fd_pixels": fid(x, self.test_pix, features=self.pixels, batch_size=500),
               "cas": cas["accuracy"], "cas_per_class": cas["per_class"],
               # how often the feature CNN recognises the intended class (a fidelity check, not CAS)
               "label_agreement": float((predict(self.net, x) == y).double().mean()), "n": int(x.shape[0])}
        if self.heldout is not None:
            out["fd_heldout"] = fid(x, self.test_held, features=self.heldout, batch_size=500)
        return out
