"""fairseq-hydra-train with our YAML configs: a few updates on tiny data, GPAM options reachable."""

import json
import os
import subprocess

import pytest
import yaml

from gpam_fairseq.checkpointing.checkpoints import load_models, load_state
from gpam_fairseq.options import DEFAULTS
from helpers import REPO, USER_DIR
from test_cli import BIN, ENV, cli, corpus  # noqa: F401  (corpus: fixture)

IWSLT = os.path.join(REPO, "examples", "iwslt14", "hydra")
WIKI103 = os.path.join(REPO, "examples", "wikitext103", "hydra")


@pytest.mark.parametrize("config_dir,name", [(IWSLT, "transformer_gpam_iwslt_de_en"), (WIKI103, "transformer_lm_gpam_wiki103")])
def test_configs_spell_out_every_gpam_option_with_its_default(config_dir, name):
    with open(os.path.join(config_dir, name + ".yaml")) as f:
        model = yaml.safe_load(f)["model"]
    for option, default in DEFAULTS.items():
        if option != "gpam_blocks":
            assert model[option] == default, option
    assert model["gpam_blocks"] == ("dec_self" if "lm" in name else "enc_self,dec_self,cross")


def log_stats(output, tag):
    """fairseq's JSON statistics as hydra's logging prints them: '[date][train_inner][INFO] - {...}'."""
    marker = f"[{tag}][INFO] - "
    return [json.loads(line.split(marker, 1)[1]) for line in output.splitlines() if marker in line]


def hydra_train(config_dir, name, overrides, cwd):
    # cwd: a temporary folder, so hydra's own log file lands there; user_dir then absolute
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", config_dir, "--config-name", name,
           f"common.user_dir={USER_DIR}", "common.fp16=false", "common.tensorboard_logdir=null", "common.log_interval=1",
           "checkpoint.no_epoch_checkpoints=true", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd)
    if proc.returncode != 0:
        pytest.fail(f"fairseq-hydra-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def test_iwslt14_config_trains_with_gpam_overrides(corpus, tmp_path):  # noqa: F811
    save_dir = tmp_path / "ckpt"
    out = hydra_train(IWSLT, "transformer_gpam_iwslt_de_en", [
        f"task.data={corpus['bin']}", "task.source_lang=src", "task.target_lang=tgt", "optimization.max_update=3",
        f"checkpoint.save_dir={save_dir}", "dataset.max_tokens=1024",
        # keys the YAML does not list are added with hydra's '+' (the legacy model has no schema)
        "+model.encoder_layers=1", "+model.decoder_layers=1", "+model.encoder_embed_dim=32", "+model.decoder_embed_dim=32",
        "+model.encoder_ffn_embed_dim=64", "+model.decoder_ffn_embed_dim=64",
        "model.gpam_lambda_pos=0.3", "model.gpam_trainable_lambda=true", "model.gpam_blocks='enc_self,cross'",
    ], cwd=tmp_path)
    assert [int(r["num_updates"]) for r in log_stats(out, "train_inner")] == [1, 2, 3]
    state = load_state(str(save_dir / "checkpoint_last.pt"))
    model_cfg = state["cfg"]["model"]
    assert model_cfg["_name"] == "transformer_gpam_iwslt_de_en" and model_cfg["gpam_lambda_pos"] == 0.3
    assert model_cfg["encoder_embed_dim"] == 32 and model_cfg["dropout"] == 0.3  # overrides and the recipe
    keys = state["model"].keys()
    assert "encoder.layers.0.self_attn.mechanism.lambda_pos_theta" in keys
    assert "decoder.layers.0.encoder_attn.mechanism.w_q_neg" in keys
    assert not any(k.startswith("decoder.layers.0.self_attn.mechanism") for k in keys)  # dec_self not in --gpam-blocks
    # the checkpoint (its cfg is a DictConfig) loads back into the same model, as fairseq-generate loads it
    models, _, _ = load_models([str(save_dir / "checkpoint_last.pt")], arg_overrides={"data": corpus["bin"]})
    layer = models[0].encoder.layers[0]
    assert layer.self_attn.mechanism.trainable_lambda and models[0].decoder.layers[0].self_attn.attention_type == "softmax"


def test_wikitext103_config_trains_adaptive_lm(corpus, tmp_path):  # noqa: F811
    lm_bin = tmp_path / "lm-bin"
    cli("fairseq-preprocess", "--only-source", "--trainpref", f"{corpus['raw']}/train.tgt", "--validpref",
        f"{corpus['raw']}/valid.tgt", "--destdir", str(lm_bin), "--workers", "1")
    save_dir = tmp_path / "ckpt"
    out = hydra_train(WIKI103, "transformer_lm_gpam_wiki103", [
        f"task.data={lm_bin}", "optimization.max_update=3", f"checkpoint.save_dir={save_dir}", "task.tokens_per_sample=32",
        "dataset.max_tokens=256", "optimization.update_freq=[1]", "lr_scheduler.warmup_updates=2",
        "model.decoder_layers=2", "model.decoder_embed_dim=32", "model.decoder_input_dim=32", "model.decoder_output_dim=32",
        "model.decoder_ffn_embed_dim=64", "model.adaptive_input_cutoff='10,20'", "model.adaptive_softmax_cutoff='10,20'",
        "model.gpam_lambda_neg=0.1",
    ], cwd=tmp_path)
    records = log_stats(out, "train_inner")
    assert [int(r["num_updates"]) for r in records] == [1, 2, 3]
    assert abs(float(records[0]["gpam/dec_self/row_sum"]) - 1.1) < 1e-3  # 1 + 0.2 - 0.1: the override reached the layers
    model_cfg = load_state(str(save_dir / "checkpoint_last.pt"))["cfg"]["model"]
    assert model_cfg["_name"] == "transformer_lm_gpam" and model_cfg["adaptive_input"] and model_cfg["decoder_normalize_before"]
