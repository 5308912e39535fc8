"""Recipe loading: typed sections, strict keys with their path in the error, --set overrides."""
import pytest

from specialize.engine.config import ConfigError, Recipe, load_recipe, recipe_from_dict


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path):
    r = load_recipe(write(tmp_path, "name: x\ntrain:\n  lr: 1\n  max_steps: 5\nloss:\n  tail: renorm\n"))
    assert isinstance(r, Recipe) and r.name == "x"
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)
    assert r.train.max_steps == 5 and r.loss.tail == "renorm"
    assert r.model.config == "t5-v1_1-small"  # default kept


@pytest.mark.parametrize("text, path", [
    ("train:\n  lrr: 1\n", "train.lrr"),
    ("bogus: 1\n", "bogus"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("train:\n  max_steps: 1.5\n", "train.max_steps"),
    ("loss:\n  tail: everything\n", "loss.tail"),
    ("data:\n  formats: {in_context_cot: high}\n", "data.formats.in_context_cot"),
    ("eval:\n  datasets: gsm8k\n", "eval.datasets"),
    ("train: 3\n", "train"),
])
def test_rejects_with_key_path(tmp_path, text, path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, text))
    assert path in str(err.value) and "r.yaml" in str(err.value)


def test_set_overrides_are_type_checked(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n")
    r = load_recipe(path, ["train.lr=1e-4", "loss.kind=sm", "eval.datasets=[gsm8k, svamp]",
                           "deepspeed.config={zero_optimization: {stage: 3}}"])
    assert r.train.lr == 1e-4 and r.loss.kind == "sm" and r.eval.datasets == ["gsm8k", "svamp"]
    assert r.deepspeed.config == {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_recipe(path, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_recipe(path, ["train.lr"])


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: invalid YAML"):
        load_recipe(write(tmp_path, "train:\n  lr: [1,\n"))


def test_optional_and_union():
    r = recipe_from_dict({"model": {"name_or_path": None}, "deepspeed": {"config": "ds.json"}})
    assert r.model.name_or_path is None and r.deepspeed.config == "ds.json"
    with pytest.raises(ConfigError, match="deepspeed.config"):
        recipe_from_dict({"deepspeed": {"config": 3}})


def test_micro_batch_sizes_per_format(tmp_path):
    text = ("data:\n  formats: {in_context_cot: 1.0, zero_shot_answer_only: 1.0}\n"
            "  micro_batch_sizes: {in_context_cot: 2, zero_shot_answer_only: 20}\ntrain:\n  micro_batch_size: 4\n")
    r = load_recipe(write(tmp_path, text))
    assert r.data.micro_batch_sizes == {"in_context_cot": 2, "zero_shot_answer_only": 20}
    assert r.data.micro_batch_size_for("zero_shot_answer_only", r.train.micro_batch_size) == 20
    # a format not named falls back to train.micro_batch_size; so does every format by default
    r2 = load_recipe(write(tmp_path, text), ["data.micro_batch_sizes={in_context_cot: 2}"])
    assert r2.data.micro_batch_size_for("zero_shot_answer_only", r2.train.micro_batch_size) == 4
    assert Recipe().data.micro_batch_sizes == {} and Recipe().data.micro_batch_size_for("in_context_cot", 8) == 8
    for bad, what in [("{zero_shot_cot: 2}", "not a format of data.formats"), ("{in_context_cot: 0}", "positive"),
                      ("{in_context_cot: true}", "expected int"), ("{in_context_cot: 2.5}", "expected int")]:
        with pytest.raises(ConfigError, match=what) as err:
            load_recipe(write(tmp_path, text), [f"data.micro_batch_sizes={bad}"])
        assert "data.micro_batch_sizes" in str(err.value) and "r.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="data.ood_dev_size"):
        recipe_from_dict({"data": {"ood_dev_size": -1}})


def test_grad_weight_fp32_enters_the_hash_only_when_set(tmp_path):
    """A field added after runs existed keeps their stage keys at its default, and changes them when set
    (the train stage then runs again), while the resolved recipe always shows it."""
    from specialize.engine.config import hashed_dict, recipe_to_dict
    default = load_recipe(write(tmp_path, "loss:\n  kind: dm\n"))
    fp32 = load_recipe(write(tmp_path, "loss:\n  kind: dm\n  grad_weight_fp32: true\n"))
    assert recipe_to_dict(default)["loss"]["grad_weight_fp32"] is False
    assert "grad_weight_fp32" not in hashed_dict(default)["loss"]
    assert hashed_dict(fp32)["loss"]["grad_weight_fp32"] is True


def test_teacher_logprobs_enters_the_hash_only_where_it_changes_what_is_computed(tmp_path):
    """For a server teacher.logprobs only declares what the server sends (the samples are the same), and
    the hf backend's "sampled" is what it computed before the setting existed: neither is hashed, so
    finished stages stay done across the upgrade. hf "raw" computes other soft targets, and is hashed."""
    from specialize.engine.config import hashed_dict, recipe_hash, recipe_to_dict
    seen = {}
    for backend in ("openai", "hf"):
        for mode in ("raw", "sampled"):
            r = load_recipe(write(tmp_path, f"teacher:\n  backend: {backend}\n  logprobs: {mode}\n"))
            assert recipe_to_dict(r)["teacher"]["logprobs"] == mode  # the resolved recipe always says it
            assert ("logprobs" in hashed_dict(r)["teacher"]) == ((backend, mode) == ("hf", "raw"))
            seen[backend, mode] = recipe_hash(r)
    assert seen["openai", "raw"] == seen["openai", "sampled"]
    assert len({seen["openai", "raw"], seen["hf", "raw"], seen["hf", "sampled"]}) == 3
    with pytest.raises(ConfigError, match="teacher.logprobs"):
        load_recipe(write(tmp_path, "teacher:\n  logprobs: tempered\n"))


@pytest.mark.parametrize("field, value", [("keep_last", 0), ("save_every", 0), ("log_every", 0), ("max_steps", 0),
                                          ("micro_batch_size", 0), ("eval_every", -1), ("dev_limit", 0)])
def test_train_periods_and_counts_out_of_range_are_refused(tmp_path, field, value):
    path = tmp_path / "r.yaml"
    path.write_text("train: {}\n")
    with pytest.raises(ConfigError, match=rf"train\.{field}: expected an int >= "):
        load_recipe(path, [f"train.{field}={value}"])
    assert load_recipe(path, ["train.eval_every=0"]).train.eval_every == 0  # dev evaluation off
