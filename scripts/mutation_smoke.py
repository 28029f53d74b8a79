"""Break a promise of tl's, one at a time, in a scratch copy, and show that the tests catch it.

    .venv/bin/python scripts/mutation_smoke.py            # every mutation (~15 minutes here)
    .venv/bin/python scripts/mutation_smoke.py cache-key  # the ones named

Each mutation is a literal replacement in one file of tl_cli/ and the tests meant to catch it;
the table at the end says caught (the tests failed) or MISSED (they passed). A mutation whose
text is no longer in the file is reported as stale, so the list cannot rot silently. Not run
in CI (`make mutate`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: (file, text, replacement, tests)
MUTATIONS = {
    "cache-key-without-weights": (
        "tl_cli/models/inputs.py",
        '"weights_sha256": digest.hexdigest(),',
        '"weights_sha256": "",',
        ["tests/test_cache.py::test_features_are_reused_and_invalidated_by_every_input_they_depend_on"],
    ),
    "cache-key-without-precision": (
        "tl_cli/models/inputs.py",
        '"precision": str(self.trainer.precision) if self._trainer is not None else "32-true",',
        '"precision": "32-true",',
        ["tests/test_cache.py::test_features_are_reused_and_invalidated_by_every_input_they_depend_on"],
    ),
    "export-parity-unchecked": (
        "tl_cli/export.py",
        "if not diff <= TOLERANCE:",
        "if False:",
        ["tests/test_export.py::test_export_refuses_and_deletes_a_model_that_disagrees"],
    ),
    "frozen-bn-not-pinned": (
        "tl_cli/callbacks/freezing.py",
        'pin = self.bn_stats == "none" or (is_frozen and self.bn_stats == "unfrozen")',
        "pin = False",
        ["tests/test_freezing.py::test_feature_extraction_freezes_weights_and_bn_statistics"],
    ),
    "unfreeze-off-by-one": (
        "tl_cli/callbacks/freezing.py",
        "applicable = [k for k in self.schedule if k <= epoch]",
        "applicable = [k for k in self.schedule if k < epoch]",
        ["tests/test_freezing.py::test_unfreeze_schedule_learning_rates_and_bn_statistics"],
    ),
    "backbone-lr-ratio-ignored": (
        "tl_cli/models/finetune.py",
        "top = self.hparams.lr * self.hparams.backbone_lr_ratio",
        "top = self.hparams.lr",
        ["tests/test_freezing.py::test_unfreeze_schedule_learning_rates_and_bn_statistics"],
    ),
    "ddp-not-rewrapped": (
        "tl_cli/callbacks/freezing.py",
        "if trainable != self._registered:",
        "if False:",
        ["tests/test_ddp.py::test_lightning_launcher_feature_extraction_then_fine_tuning_ranks_agree"],
    ),
    "rng-not-restored": (
        "tl_cli/callbacks/resume.py",
        'torch.set_rng_state(state["cpu"])',
        "pass",
        ["tests/test_preemption.py::test_feature_extraction_preempted_mid_epoch_resumes_exactly"],
    ),
    "sampler-skip-ignored": (
        "tl_cli/data/datasets.py",
        "start = self._skip[1] if self._skip[0] == self.epoch else 0",
        "start = 0",
        ["tests/test_preemption.py::test_fine_tuning_preempted_mid_epoch_resumes_exactly"],
    ),
    "ddp-duplicates-counted": (
        "tl_cli/models/reporting.py",
        "first[1:] = index[1:] != index[:-1]",
        "first[1:] = True",
        ["tests/test_ddp.py::test_test_and_validation_count_every_image_once_and_a_rank0_failure_stops_all"],
    ),
    "class-weights-ignored": (
        "tl_cli/models/base.py",
        "weight=self.loss_weight",
        "weight=None",
        ["tests/test_class_weights.py::test_class_weights_change_the_training_loss"],
    ),
    "confusion-matrix-transposed": (
        "tl_cli/reports/files.py",
        '"confusion_matrix": cm.long().tolist(),',
        '"confusion_matrix": cm.long().T.tolist(),',
        ["tests/test_reports_files.py::test_metrics_match_a_hand_computed_case"],
    ),
    "interpolation-ignored": (
        "tl_cli/data/transforms.py",
        'interpolation = _interpolation(preprocessing["interpolation"])',
        "interpolation = _interpolation('bilinear')",
        ["tests/test_cache.py::test_cached_images_give_the_pixels_of_the_classic_eval_transform"],
    ),
    "flip-never": (
        "tl_cli/data/transforms.py",
        "ops += [v2.CenterCrop(size), v2.RandomHorizontalFlip()]",
        "ops += [v2.CenterCrop(size)]",
        ["tests/test_augment.py::test_flip_flips_half_the_time_and_nothing_else"],
    ),
    "last-ckpt-only-on-improvement": (
        "tl_cli/callbacks/checkpoint.py",
        "if self.save_last and not self._should_skip_saving_checkpoint(trainer):",
        "if False:",
        [
            "tests/test_selection.py::test_best_checkpoint_is_the_lowest_validation_loss",
            "tests/test_selection.py::test_last_ckpt_is_the_last_epoch_even_when_it_did_not_improve",
        ],
    ),
    "first-pass-decodes-twice": (
        "tl_cli/data/first_pass.py",
        "kept = samples if known is None else _apply(where, samples, known, on_bad_image, say, staged)",
        "kept = samples if known is None else _apply(where, samples, known, on_bad_image, say, staged)\n    known = None",
        ["tests/test_cache.py::test_first_run_decodes_each_image_once"],
    ),
    "mistakes-least-confident-first": (
        "tl_cli/reports/files.py",
        "wrong.sort(key=lambda i: -float(conf[i]))",
        "wrong.sort(key=lambda i: float(conf[i]))",
        ["tests/test_reports_files.py::test_mistakes_are_the_most_confident_ones_first"],
    ),
    "data-check-strict-ignored": (
        "tl_cli/cli/commands.py",
        'return 0 if report["ok"] and not (args.strict and leaks) else 1',
        'return 0 if report["ok"] else 1',
        ["tests/test_data_tools.py::test_data_check_strict_fails_on_leaks_and_min_size_sets_small"],
    ),
    "probe-head-not-set": (
        "tl_cli/models/feature_extraction.py",
        "self.head.weight.copy_(probe.weight.to(self.head.weight))",
        "pass",
        ["tests/test_probe.py::test_feature_extraction_head_starts_as_the_tuned_probe"],
    ),
    "probe-val-choice-ignored": (
        "tl_cli/models/probe.py",
        "if best is None or score(acc, loss) > score(best[1], best[2]):",
        "if True:",
        ["tests/test_probe.py::test_linear_probe_is_scikit_learns_logistic_regression_with_c_chosen_on_val"],
    ),
    "channels-last-cuda-only": (
        "tl_cli/models/inputs.py",
        'in ("CUDAAccelerator", "CPUAccelerator")',
        'in ("CUDAAccelerator",)',
        ["tests/test_cache.py::test_channels_last_is_the_cpu_default_and_changes_no_result"],
    ),
    "probe-rule-threshold-off-by-one": (
        "tl_cli/models/probe.py",
        "by_accuracy = len(yv) >= ACCURACY_FROM",
        "by_accuracy = len(yv) > ACCURACY_FROM",
        [
            "tests/test_probe.py::"
            "test_probe_strength_is_chosen_by_accuracy_on_a_large_val_split_and_by_loss_on_a_small_one"
        ],
    ),
    "probe-always-by-loss": (
        "tl_cli/models/probe.py",
        "return (acc, -loss) if by_accuracy else (-loss, acc)",
        "return (-loss, acc)",
        [
            "tests/test_probe.py::"
            "test_probe_strength_is_chosen_by_accuracy_on_a_large_val_split_and_by_loss_on_a_small_one"
        ],
    ),
    "neck-not-trained": (
        "tl_cli/models/finetune.py",
        'groups = super().param_groups() + ([{"params": neck, "lr": self.hparams.lr, "name": "neck"}] if neck else [])',
        "groups = super().param_groups()",
        ["tests/test_freezing.py::test_layer_decay_gives_each_stage_its_own_rate_and_every_parameter_one_group"],
    ),
    "starting-point-never-kept": (
        "tl_cli/models/starting_point.py",
        "path = callback.replace_best(model.trainer, checkpoint, begin)",
        "return",
        ["tests/test_selection.py::test_fine_tuning_never_ends_worse_than_its_starting_point"],
    ),
    "tta-ignored": (
        "tl_cli/models/base.py",
        'if self.hparams.get("tta", "none") == "none" or x.ndim != 4:',
        "if True:",
        ["tests/test_predict.py::test_flip_tta_averages_each_image_with_its_mirror_and_is_recorded"],
    ),
    "augment-same-every-epoch": (
        "tl_cli/data/datasets.py",
        "sample_seed(self.seed, self.epoch, i + p * self.n)",
        "sample_seed(self.seed, 0, i + p * self.n)",
        [
            "tests/test_augment.py::test_training_images_change_every_epoch_follow_the_seed_and_not_the_workers",
            "tests/test_augment.py::test_a_resumed_run_sees_the_epoch_1_views_of_an_uninterrupted_one",
        ],
    ),
    "augment-ignores-the-run-seed": (
        "tl_cli/data/datasets.py",
        "sample_seed(self.seed, self.epoch, i + p * self.n)",
        "sample_seed(0, self.epoch, i + p * self.n)",
        ["tests/test_augment.py::test_training_images_change_every_epoch_follow_the_seed_and_not_the_workers"],
    ),
    "augment-seed-unused": (
        "tl_cli/data/datasets.py",
        "torch.manual_seed(seed)",
        "pass",
        ["tests/test_augment.py::test_training_images_change_every_epoch_follow_the_seed_and_not_the_workers"],
    ),
    "epoch-draws-with-replacement": (
        "tl_cli/data/datasets.py",
        "order = torch.randperm(self.n, generator=generator).tolist()",
        "order = torch.randint(self.n, (self.n,), generator=generator).tolist()",
        ["tests/test_augment.py::test_training_images_change_every_epoch_follow_the_seed_and_not_the_workers"],
    ),
    "export-json-resize-without-crop-pct": (
        "tl_cli/export.py",
        '"resize_short_side": int(min(height, width) / prep["crop_pct"]),',
        '"resize_short_side": min(height, width),',
        ["tests/test_export.py::test_a_client_following_the_export_json_gets_tls_inputs_and_probabilities"],
    ),
    "export-json-interpolation-fixed": (
        "tl_cli/export.py",
        '"interpolation": prep["interpolation"],',
        '"interpolation": "bilinear",',
        ["tests/test_export.py::test_a_client_following_the_export_json_gets_tls_inputs_and_probabilities"],
    ),
    "resize-long-side": (
        "tl_cli/data/transforms.py",
        "picture = v2.Resize(side, interpolation",
        "picture = v2.Resize(None, max_size=side, interpolation",
        ["tests/test_export.py::test_a_client_following_the_export_json_gets_tls_inputs_and_probabilities"],
    ),
    "normalize-shift-wrong": (
        "tl_cli/data/transforms.py",
        'self.register_buffer("shift", (mean_t / std_t)',
        'self.register_buffer("shift", (mean_t / std_t.mean())',
        ["tests/test_export.py::test_a_client_following_the_export_json_gets_tls_inputs_and_probabilities"],
    ),
    "skip-forgotten-on-reuse": (
        "tl_cli/data/first_pass.py",
        "kept = samples if known is None else _apply(where, samples, known, on_bad_image, say, staged)",
        "kept = samples",
        ["tests/test_bad_images.py::test_skip_holds_on_a_second_run_over_the_same_cache"],
    ),
    "skip-silent-on-reuse": (
        "tl_cli/data/first_pass.py",
        "kept = samples if known is None else _apply(where, samples, known, on_bad_image, say, staged)",
        "kept = samples if known is None else _apply(where, samples, known, on_bad_image, lambda _: None, staged)",
        ["tests/test_bad_images.py::test_skip_holds_on_a_second_run_over_the_same_cache"],
    ),
    "screening-not-remembered": (
        "tl_cli/data/first_pass.py",
        "            screen.save(problems)",
        "            pass",
        ["tests/test_bad_images.py::test_skip_holds_on_a_second_run_over_the_same_cache"],
    ),
    "skip-matches-path-spelling": (
        "tl_cli/data/first_pass.py",
        "if str(p) not in dropped and source_name(p, staged) not in dropped]",
        "if str(p) not in dropped]",
        ["tests/test_bad_images.py::test_skip_holds_when_the_second_run_names_the_folder_another_way"],
    ),
    "skip-paths-not-the-loaders": (
        "tl_cli/data/module.py",
        "            self._samples[split] = ready.samples",
        "            pass",
        ["tests/test_bad_images.py::test_what_skip_keeps_trains_with_its_own_pixels_and_label_run_after_run"],
    ),
    "expected-duration-without-validation": (
        "tl_cli/callbacks/progress.py",
        "total = elapsed + steps_left * step + epochs_left * val_batches * val_batch",
        "total = elapsed + steps_left * step",
        ["tests/test_expected_duration.py"],
    ),
    "expected-duration-never-revised": (
        "tl_cli/callbacks/progress.py",
        "if abs(total - self._said) > 0.25 * self._said:",
        "if False:",
        ["tests/test_expected_duration.py"],
    ),
    "gray-cache-not-repeated": (
        "tl_cli/data/datasets.py",
        "return image.repeat(3, 1, 1) if c == 1 else image",
        "return image",
        ["tests/test_small_images.py"],
    ),
    "gray-cache-three-channels": (
        "tl_cli/data/cache.py",
        "            return arr[..., :1]",
        "            return arr",
        ["tests/test_small_images.py"],
    ),
    "recipe-line-ignores-schedule": (
        "tl_cli/models/finetune.py",
        'f"the last {min(n, stages)} of {stages} from epoch {e}" for e, n in sorted(freezing.schedule.items())',
        'f"the last 4 of {stages} from epoch 0" for e, n in sorted(freezing.schedule.items())[:1]',
        ["tests/test_recipe.py"],
    ),
}


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if not name or not (REPO / name).is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())


def main(names: list[str]) -> int:
    chosen = {n: MUTATIONS[n] for n in names} if names else MUTATIONS
    rows = []
    for name, (file, text, replacement, tests) in chosen.items():
        with tempfile.TemporaryDirectory(prefix="tl-mutant-") as tmp:
            scratch = Path(tmp)
            copy_repo(scratch)
            path = scratch / file
            source = path.read_text()
            if text not in source:
                rows.append((name, "stale", 0.0))
                continue
            path.write_text(source.replace(text, replacement, 1))
            where = subprocess.run(
                [sys.executable, "-c", "import tl_cli; print(tl_cli.__file__)"],
                cwd=scratch,
                capture_output=True,
                text=True,
            ).stdout
            if not where.startswith(str(scratch)):
                raise SystemExit(f"the scratch copy's tests would import {where.strip()}, not the mutant")
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                cwd=scratch,
                capture_output=True,
                text=True,
            )
            verdict = "caught" if done.returncode != 0 else "MISSED"
            rows.append((name, verdict, time.perf_counter() - start))
            print(f"{name:<32} {verdict:<7} {rows[-1][2]:6.1f} s", flush=True)
    print("\n| mutation | verdict | seconds |\n| --- | --- | --- |")
    for name, verdict, seconds in rows:
        print(f"| {name} | {verdict} | {seconds:.0f} |")
    return 0 if all(v == "caught" for _, v, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
