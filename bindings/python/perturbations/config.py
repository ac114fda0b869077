"""`Config`: the settings of ops, validated by the library."""

import ctypes
import threading

from ._native import P, lib
from .errors import InvalidArgumentError, _check

__all__ = ["Config"]

NOISE = {"normal": 0, "gumbel": 1, "sum_of_gamma": 2}
PERTURBATION = {"additive": 0, "multiplicative": 1}
BASELINE = {"none": 0, "sample_mean": 1, "clean_input": 2}
SENSE = {"maximize": 0, "minimize": 1}

# every setting, its default (the C library's) and the order repr shows them in
DEFAULTS = {
    "num_samples": 1000, "sigma": 0.05, "noise": "normal", "seed": 0, "device": "auto", "threads": 1,
    "max_threads": 0, "perturbation": "additive", "baseline": "sample_mean", "antithetic": False,
    "sense": "maximize", "chunk_bytes": 0, "max_tape_bytes": 0, "sog_kappa": 5.0, "sog_terms": 10,
    "solve_ratio": 1.0, "linear_objective": False, "remote_timeout": 60.0,
}

# the parameters of Sum-of-Gamma noise, set with it (pert_config_set_sum_of_gamma)
_SOG = ("sog_kappa", "sog_terms")


def unsigned(value, bits, what):
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(2, f"{what} must be an integer in 0 .. 2^{bits} - 1, got {value!r}") from None
    if v != value or not 0 <= v < 1 << bits:
        raise InvalidArgumentError(2, f"{what} must be an integer in 0 .. 2^{bits} - 1, got {value!r}")
    return v


def choice(table, value, what):
    """(the C number, the name) of a choice given by name or number."""
    if isinstance(value, str):
        if value not in table:
            raise InvalidArgumentError(2, f"unknown {what} {value!r}; one of {', '.join(sorted(table))}")
        return table[value], value
    names = {v: k for k, v in table.items()}
    if isinstance(value, bool) or not isinstance(value, int) or value not in names:
        raise InvalidArgumentError(2, f"unknown {what} {value!r}; one of {', '.join(sorted(table))}")
    return value, names[value]


def _set(h, key, value):
    """Sets one setting on the C config; returns the value as the Config reports it."""
    if key in ("num_samples", "seed", "chunk_bytes", "max_tape_bytes"):
        v = unsigned(value, 64, key)
        _check(getattr(lib, f"pert_config_set_{key}")(h, v))
        return v
    if key in ("threads", "max_threads"):
        v = unsigned(value, 32, key)
        _check(getattr(lib, f"pert_config_set_{key}")(h, v))
        return v
    if key == "sigma":
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(2, f"sigma must be a number, got {value!r}") from None
        _check(lib.pert_config_set_sigma(h, v))
        return v
    if key == "device":
        v = str(value)
        _check(lib.pert_config_set_device(h, v.encode()))
        return v
    if key in ("antithetic", "linear_objective"):
        v = bool(value)
        _check(getattr(lib, f"pert_config_set_{key}")(h, v))
        return v
    if key in ("solve_ratio", "remote_timeout"):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(2, f"{key} must be a number, got {value!r}") from None
        _check(getattr(lib, f"pert_config_set_{key}")(h, v))
        return v
    table = {"noise": NOISE, "perturbation": PERTURBATION, "baseline": BASELINE, "sense": SENSE}.get(key)
    if table is None:
        raise TypeError(f"unknown Config setting {key!r}; one of {', '.join(DEFAULTS)}")
    code, name = choice(table, value, key)
    _check(getattr(lib, f"pert_config_set_{key}")(h, code))
    return name


def _sog(values):
    """(kappa, terms) of Sum-of-Gamma noise from the settings, as the C call takes them."""
    try:
        kappa = float(values["sog_kappa"])
    except (TypeError, ValueError):
        raise InvalidArgumentError(2, f"sog_kappa must be a number, got {values['sog_kappa']!r}") from None
    return kappa, unsigned(values["sog_terms"], 32, "sog_terms")


def _scratch():
    h = P()
    _check(lib.pert_config_new(ctypes.byref(h)))
    return h


class Config:
    """Settings of ops, every C setting as a keyword (validated by the library), and as an
    attribute to read or set:

    num_samples (1000), sigma (0.05), noise ("normal" | "gumbel" | "sum_of_gamma"), seed (0), device
    ("auto", "cpu", "cuda", "cuda:1"), threads (1; 0: one per core), max_threads (0: no
    cap), perturbation ("additive" | "multiplicative"), baseline ("sample_mean" | "none" |
    "clean_input"), antithetic (False), sense ("maximize" | "minimize"), chunk_bytes (0:
    the library's), max_tape_bytes (0: no limit), sog_kappa (5.0) and sog_terms (10): the
    parameters of Sum-of-Gamma noise (I-MLE's; no tape: see PERT_NOISE_SUM_OF_GAMMA),
    solve_ratio (1.0: the share of a pooled op's samples that are solved, see `Op.set_pool`;
    0 solves none once the pool holds a solution, as PyEPO's solve_ratio=0)
    linear_objective (False: declares a solver's objective linear, <x, y>, which a pool
    needs) and remote_timeout (60.0 seconds: the longest one solve may take on a rank of
    an op of `perturbations.mpi` before the call fails).

    A bad value raises `InvalidArgumentError` (a `ValueError`), an unknown name `TypeError`.
    An op copies its config: changing a config later does not change its ops. Configs
    can be copied and pickled."""

    def __init__(self, **settings):
        h = P()
        _check(lib.pert_config_new(ctypes.byref(h)))
        self._h = h
        self._lock = threading.Lock()
        self._values = dict(DEFAULTS)
        for key, value in settings.items():
            self.set(key, value)

    def set(self, key, value):
        """Sets one setting; returns the config."""
        with self._lock:
            if not self._h:
                raise InvalidArgumentError(2, "the Config was closed")
            if key in _SOG:
                values = dict(self._values, **{key: value})
                kappa, terms = _sog(values)
                # checked by the library (on this config when its noise is Sum-of-Gamma)
                target = self._h if values["noise"] == "sum_of_gamma" else _scratch()
                try:
                    _check(lib.pert_config_set_sum_of_gamma(target, kappa, terms))
                finally:
                    if target is not self._h:
                        lib.pert_config_free(target)
                self._values[key] = kappa if key == "sog_kappa" else terms
            else:
                self._values[key] = _set(self._h, key, value)
                if key == "noise" and self._values["noise"] == "sum_of_gamma":
                    _check(lib.pert_config_set_sum_of_gamma(self._h, *_sog(self._values)))
        return self

    def settings(self):
        """Every setting, as a dict of keywords for `Config(**...)`."""
        return dict(self._values)

    def close(self):
        """Frees the library's copy now (a closed config cannot make ops); also done when
        the config is garbage collected."""
        with self._lock:
            h, self._h = self._h, None
        if h:
            lib.pert_config_free(h)

    def __del__(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            lib.pert_config_free(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def handle(self):
        if not self._h:
            raise InvalidArgumentError(2, "the Config was closed")
        return self._h

    def __repr__(self):
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __eq__(self, other):
        return isinstance(other, Config) and self._values == other._values

    __hash__ = None

    def __reduce__(self):
        return (_from_settings, (self.settings(),))

    def __copy__(self):
        return Config(**self._values)

    def __deepcopy__(self, memo):
        return Config(**self._values)


def _from_settings(settings):
    return Config(**settings)


def _property(key):
    def get(self):
        return self._values[key]

    def put(self, value):
        self.set(key, value)

    return property(get, put, doc=f"The {key} setting.")


for _key in DEFAULTS:
    setattr(Config, _key, _property(_key))
