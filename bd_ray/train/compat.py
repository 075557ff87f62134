"""Driver-side checks before any Ray process starts: do the verifier (teacher), the drafter, the
draft vocabulary, offline targets and the config fit together; local paths made absolute for workers.

A mismatch found here is one clear error (jobs/train_drafter.py exits 2), not a crash inside a worker.
"""

from __future__ import annotations

import os

from bd_ray import models
from bd_ray.config.train import TrainJobConfig
from bd_ray.draft_vocab import load_draft_vocab
from bd_ray.teacher_targets import read_manifest

__all__ = ["ModelCompatError", "check_models_compatible", "check_offline_targets", "absolute_local_paths"]


class ModelCompatError(ValueError):
    """The verifier (teacher), the drafter and the config do not fit together (positions, layers)."""


def check_models_compatible(cfg: TrainJobConfig, verifier_path: str) -> None:
    """Driver-side checks of the teacher/drafter pair against each other and the config, from the
    checkpoints' config and tokenizer files only (no weights, no Ray).

    Checks: the drafter's tokenizer equals the verifier's (vocabulary, id -> string map, special
    tokens, splitting; ``bd_ray.models.check_tokenizer_compat``) and so do the models' vocabulary
    sizes (``config.vocab_size``, the logits width); both models hold a window of
    ``data.prefix_len + data.continuation_len`` positions (``max_position_embeddings``); a drafter
    made from the verifier's first ``models.drafter_layers`` layers has that many layers to take.

    Raises:
        bd_ray.models.TokenizerMismatchError: tokenizers or vocabulary sizes differ.
        ModelCompatError: a window longer than a model's positions; too many drafter layers.
        FileNotFoundError: a model path that does not exist.
    """
    from transformers import AutoConfig

    window = cfg.data.window_len

    def text_config(path):
        return AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()

    def positions(c, who: str, name: str) -> None:
        n = getattr(c, "max_position_embeddings", None)
        if n is not None and n < window:
            raise ModelCompatError(
                f"the {who} {name!r} has max_position_embeddings={n}, but a training window is "
                f"data.prefix_len + data.continuation_len = {cfg.data.prefix_len} + "
                f"{cfg.data.continuation_len} = {window} positions; shorten the window or use a "
                f"{who} with more positions")

    vcfg = text_config(verifier_path)
    positions(vcfg, "verifier (teacher)", cfg.models.verifier)
    n_layers = getattr(vcfg, "num_hidden_layers", None)
    from_verifier = models.FROM_VERIFIER.match(str(cfg.models.drafter or ""))
    if from_verifier:  # "from-verifier:N": the verifier's first N layers (same tokenizer and positions)
        if n_layers is not None and int(from_verifier.group(1)) > n_layers:
            raise ModelCompatError(f"models.drafter={cfg.models.drafter!r}, but the verifier "
                                   f"{cfg.models.verifier} has only {n_layers} layers to copy")
    elif cfg.models.drafter:
        dpath, tpath = models.drafter_paths(cfg.models.drafter)  # a checkpoint dir or a shipped drafter
        dcfg = text_config(dpath)
        models.check_tokenizer_compat(models.load_tokenizer(verifier_path), models.load_tokenizer(tpath),
                                      verifier_vocab_size=getattr(vcfg, "vocab_size", None),
                                      drafter_vocab_size=getattr(dcfg, "vocab_size", None))
        positions(dcfg, "drafter", cfg.models.drafter)
    elif n_layers is not None and cfg.models.drafter_layers > n_layers:
        raise ModelCompatError(f"models.drafter_layers={cfg.models.drafter_layers}, but the verifier "
                               f"{cfg.models.verifier} has only {n_layers} layers to copy")
    if cfg.models.draft_vocab:
        try:
            dv = load_draft_vocab(cfg.models.draft_vocab)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ModelCompatError(f"models.draft_vocab={cfg.models.draft_vocab!r} cannot be read: {e} "
                                   f"(make one with jobs/draft_vocab.py)") from e
        if getattr(vcfg, "vocab_size", None) is not None and dv.vocab_size != vcfg.vocab_size:
            raise ModelCompatError(f"models.draft_vocab={cfg.models.draft_vocab!r} is a subset of a "
                                   f"{dv.vocab_size}-token vocabulary, the verifier has {vcfg.vocab_size}")


def check_offline_targets(cfg: TrainJobConfig) -> dict:
    """The manifest of ``teacher.targets_path`` (``teacher.mode=offline``), checked against ``data``.

    Raises:
        FileNotFoundError: not a finished jobs/teacher_targets.py output.
        ModelCompatError: the targets were made for other window lengths than ``data``'s.
    """
    man = read_manifest(cfg.teacher.targets_path)
    if (man["prefix_len"], man["continuation_len"]) != (cfg.data.prefix_len, cfg.data.continuation_len):
        raise ModelCompatError(
            f"teacher.targets_path={cfg.teacher.targets_path!r} holds targets for windows of "
            f"{man['prefix_len']} + {man['continuation_len']} tokens, but data.prefix_len + "
            f"data.continuation_len = {cfg.data.prefix_len} + {cfg.data.continuation_len}: set those to "
            f"match, or rerun jobs/teacher_targets.py with this data config")
    return man


def absolute_local_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """A copy of ``cfg`` whose relative local paths (``models.drafter``, ``models.draft_vocab``,
    ``teacher.targets_path``) are made absolute against the driver's working directory.

    Why: Ray Train runs the training function in a worker whose working directory is not the
    driver's, so ``runs/draft_vocab/x.json`` given on the command line would not be found there.
    Registered names (``smollm2-135m``), ``from-verifier:N`` and URIs (``s3://``) are left alone;
    so is a relative ``models.drafter`` that does not exist locally (it may be a registered name).
    """
    def local(path: str | None, must_exist: bool) -> str | None:
        if not path or "://" in path or os.path.isabs(path) or path.startswith("from-verifier:"):
            return path
        if must_exist or os.path.exists(path):
            return os.path.abspath(path)
        return path

    upd = cfg.model_copy(deep=True)
    upd.models.drafter = local(upd.models.drafter, must_exist=False)
    upd.models.draft_vocab = local(upd.models.draft_vocab, must_exist=True)
    if upd.teacher.targets_path:
        upd.teacher.targets_path = local(upd.teacher.targets_path, must_exist=True)
    return upd

