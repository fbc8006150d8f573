import torch
from torch import nn

from data import Split
from evaluate import metrics, predict, print_metrics, write_predictions
from runtime import Runtime
from settings import Fields

SST = ["awful", "bad", "average", "good", "excellent"]


class FirstTokenScores(nn.Module):
    """Stands in for a classifier: row i of the output holds example i's first token and its length."""

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.stack([tokens[:, 0].float(), lengths.float()], dim=1)


def test_predictions_come_back_in_input_order_whatever_the_batches():
    token_ids = [[i] + [99] * length for i, length in enumerate([5, 1, 8, 3, 3, 0, 6])]
    split = Split("dev", [0] * 7, ["s"] * 7, token_ids)
    for batch_size in (1, 2, 3, 7):
        scores = predict(FirstTokenScores(), split, batch_size, pad_id=0, runtime=Runtime(torch.device("cpu")))
        assert scores[:, 0].tolist() == list(range(7))
        assert scores[:, 1].tolist() == [len(ids) for ids in token_ids]


def test_metrics_are_accuracy_and_macro_f1():
    acc, f1 = metrics([0, 0, 1, 1], [0, 1, 1, 1])
    assert acc == 0.75
    assert abs(f1 - (2 / 3 + 0.8) / 2) < 1e-12  # F1 of label 0: 2/3, of label 1: 0.8


def test_the_confusion_matrix_has_the_label_names_and_true_labels_as_rows(capsys):
    split = Split("dev", [0, 0, 1, 2], ["a", "b", "c", "d"], [[1]] * 4)
    print_metrics(split, [0, 1, 1, 1], ["neg", "neutral", "pos"], confusion=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dev acc :: 0.500  macro-F1 :: 0.389"
    assert lines[2].split() == ["neg", "neutral", "pos"]
    assert [line.split() for line in lines[3:]] == [["neg", "1", "1", "0"], ["neutral", "0", "1", "0"],
                                                    ["pos", "0", "1", "0"]]


def test_a_split_of_one_label_value_says_its_accuracy_may_mean_nothing(capsys):
    print_metrics(Split("test", [0, 1], ["a", "b"], [[1], [1]]), [0, 1], ["neg", "pos"], confusion=False)
    assert "means nothing" not in capsys.readouterr().out
    print_metrics(Split("test", [0, 0], ["a", "b"], [[1], [1]]), [0, 1], ["neg", "pos"], confusion=False)
    assert "this accuracy means nothing" in capsys.readouterr().out


def test_prediction_files_have_one_label_line_per_input(tmp_path):
    path = tmp_path / "out.txt"
    write_predictions(str(path), [2, 0], Split("dev", [1, 0], ["A fine film .", "Dull ."], [[1], [1]]), SST)
    assert path.read_text(encoding="utf-8") == "2 ||| A fine film .\n0 ||| Dull .\n"
    with_blanks = Split("input", [None, None], ["A fine film .", "Dull ."], [[1], [1]], lines=[2, 3], n_lines=5)
    write_predictions(str(path), [2, 0], with_blanks, SST)
    assert path.read_text(encoding="utf-8") == "\n2 ||| A fine film .\n0 ||| Dull .\n\n\n"


def test_data_with_label_names_gets_predictions_with_names(tmp_path):
    named = Split("dev", [3, 0], ["A fine film .", "Dull ."], [[1], [1]], named=True, fields=Fields("review", "y"))
    write_predictions(str(tmp_path / "out.txt"), [2, 4], named, SST)
    assert (tmp_path / "out.txt").read_text() == "average ||| A fine film .\nexcellent ||| Dull .\n"
    write_predictions(str(tmp_path / "out.jsonl"), [2, 4], named, SST)
    assert (tmp_path / "out.jsonl").read_text() == ('{"review": "A fine film .", "y": "average"}\n'
                                                    '{"review": "Dull .", "y": "excellent"}\n')
    write_predictions(str(tmp_path / "out.csv"), [2, 4], named, SST)
    assert (tmp_path / "out.csv").read_text() == "review,y\nA fine film .,average\nDull .,excellent\n"


