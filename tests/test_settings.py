from settings import LoRASettings, RunFiles


def test_a_run_names_all_its_files_after_the_checkpoint():
    files = RunFiles.beside("runs/sst-lora.pt")
    assert (files.checkpoint, files.state, files.metrics, files.curves) == (
        "runs/sst-lora.pt", "runs/sst-lora.pt.state", "runs/sst-lora.metrics.jsonl", "runs/sst-lora.png")
    assert [path for _, path in files.outputs()] == [files.checkpoint, files.state, files.metrics, files.curves]


def test_lora_settings_are_recorded_as_plain_values():
    settings = LoRASettings(rank=4, alpha=1.0, dropout=0.0, targets=("wq", "wv"))
    record = settings.as_record()
    assert record == {"rank": 4, "alpha": 1.0, "dropout": 0.0, "targets": ["wq", "wv"]}
    assert type(record["targets"]) is list  # what earlier checkpoints hold, so that --resume compares equal
    assert LoRASettings.from_record(record) == settings
