"""The memory check before the work: an input size that cannot fit is one line, not the
out-of-memory killer after minutes; the estimates are lower bounds measured on a dry run."""
import pytest
import torch
from torch import nn

import gpu_train
from common import preflight
from common.errors import UserError

CPU = torch.device("cpu")
GB = 10**9


def test_saved_activations_are_the_tensors_kept_for_backward_each_counted_once():
    # conv saves its input (counted with the inputs) and weight (counted with the weights); ReLU
    # saves its output: 2 x 4 x 8 x 8 float32 = 2048 bytes
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    assert preflight.saved_activation_bytes(model, torch.randn(2, 3, 8, 8)) == 2048

    class Square(nn.Module):  # y = relu(conv(x)) is saved by relu and twice by y * y: one tensor
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return y * y

    assert preflight.saved_activation_bytes(Square(), torch.randn(2, 3, 8, 8)) == 2048


def test_the_dry_run_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert preflight.activation_bytes_per_pixel(model, 3, CPU, 224) > 0
    assert not model.training
    model.train()
    model[1].eval()  # a frozen BatchNorm in a model that trains keeps its own mode
    preflight.activation_bytes_per_pixel(model, 3, CPU, 224)
    assert model.training and model[0].training and not model[1].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched


def test_a_model_that_cannot_take_small_inputs_is_measured_at_its_size_or_not_at_all():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 96 * 96, 2)

        def forward(self, x):
            if x.shape[-1] != 96:
                raise RuntimeError("input size must be 96")
            return torch.relu(self.fc(x.flatten(1)))

    per_pixel = preflight.activation_bytes_per_pixel(Fixed(), 3, CPU, 96)
    assert per_pixel == pytest.approx(2 * 2 * 4 / (2 * 96 * 96))  # the ReLU output, 2 x 2 float32
    assert preflight.activation_bytes_per_pixel(Fixed(), 3, CPU, 1000) is None  # no estimate, no refusal
    preflight.check_training_memory(Fixed(), "--img-size", 1000, 3, 8, CPU, print, budget=(1, "RAM"))


def test_input_size_check_refuses_what_cannot_fit_and_passes_what_can():
    budget = (24 * GB, "of available RAM")
    preflight.check_input_size("--img-size", 224, 224, 3, 32, CPU, budget)  # 43 MB: fine
    with pytest.raises(UserError) as info:
        preflight.check_input_size("--img-size", 100000, 100000, 3, 32, CPU, budget)
    text = str(info.value)
    assert text.startswith("--img-size 100000: inputs of 100000 x 100000 px cannot fit")
    assert "8.6 TB" in text and "24.0 GB of available RAM" in text
    side = int(text.split("about ")[1].split(" px")[0])
    assert side == int((24 * GB / 32 / (9 * 3)) ** 0.5)  # the largest square batch that fits
    preflight.check_input_size("--img-size", side, side, 3, 32, CPU, budget)  # and it does fit
    with pytest.raises(UserError):
        preflight.check_input_size("--img-size", side + 1, side + 1, 3, 32, CPU, budget)
    # where out-of-memory recovery can split the batch (CUDA), only one input must fit
    preflight.check_input_size("--img-size", 2 * side, 2 * side, 3, 32, CPU, budget, recovers=True)


def test_training_memory_check_on_the_cpu_suggests_a_size_and_a_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2))
    per_pixel = preflight.activation_bytes_per_pixel(model, 3, CPU, 256)
    per_input = (per_pixel + 9 * 3) * 256 * 256
    budget = (int(10.5 * per_input), "of available RAM")
    preflight.check_training_memory(model, "--img-size", 256, 3, 10, CPU, print, budget=budget)
    with pytest.raises(UserError) as info:
        preflight.check_training_memory(model, "--img-size", 256, 3, 32, CPU, print, budget=budget)
    text = str(info.value)
    assert "training cannot fit: a batch of 32" in text and "--batch-size (about 10)" in text
    notes = []
    preflight.check_training_memory(model, "--img-size", 256, 3, 32, CPU, notes.append, budget=budget,
                                    recovers=True)
    assert len(notes) == 1 and "out-of-memory recovery will split it" in notes[0]


def test_gpu_train_refuses_an_impossible_img_size_before_reading_any_image(dataset, tmp_path, capsys,
                                                                          monkeypatch):
    reads = []
    monkeypatch.setattr("common.data.images.load_rgb", lambda *a, **k: reads.append(a))
    out = tmp_path / "out"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), "--model", "small_cnn",
                           "--img-size", "100000", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --img-size 100000: inputs of 100000 x 100000 px")
    assert reads == [] and not (out / "checkpoint.pth").exists()


def test_gpu_train_checks_the_model_at_its_size_before_the_first_step(dataset, tmp_path, capsys,
                                                                     monkeypatch):
    """Inputs that can be prepared but a model that cannot train on them: refused once the model
    is built, with the estimate, before any epoch."""
    monkeypatch.setattr(preflight, "memory_budget", lambda device: (400_000, "of available RAM"))
    out = tmp_path / "out"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), "--model", "small_cnn",
                           "--img-size", "32", "--batch-size", "8", "--epochs", "1",
                           "--data-cache", "off"]) == 2
    err = capsys.readouterr().err
    assert "error: --img-size 32: training cannot fit" in err and "400.0 kB of available RAM" in err
    assert not (out / "checkpoint.pth").exists() and not (out / "metrics.csv").exists()


def test_finetune_checks_the_model_at_its_size_too(dataset, tmp_path, capsys, monkeypatch):
    import finetune_gpu

    out = tmp_path / "out"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), "--model", "small_cnn",
                           "--img-size", "32", "--batch-size", "8", "--epochs", "1",
                           "--num-workers", "0"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(preflight, "memory_budget", lambda device: (400_000, "of available RAM"))
    assert finetune_gpu.main(["--model-path", str(out / "best_model.pth"), "--data-dir", str(dataset),
                              "--output", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "8",
                              "--num-workers", "0", "--log-dir", str(tmp_path / "logs")]) == 2
    assert "error: --img-size 32: training cannot fit" in capsys.readouterr().err


def test_scaled_memory_check_suggests_a_scale_that_fits_and_a_batch():
    """train_unet.py: the largest image at -s/--scale; the suggested scale must itself pass."""
    from common.models import build_model

    model, _ = build_model("unet", 2, bilinear=False, base=8)
    budget = (400 * 10**6, "of available RAM")
    preflight.check_scaled_memory(model, 64, 96, 1.0, 3, 4, CPU, print, budget=budget)
    with pytest.raises(UserError) as info:
        preflight.check_scaled_memory(model, 4000, 6000, 0.5, 3, 4, CPU, print, budget=budget)
    text = str(info.value)
    assert text.startswith("-s/--scale 0.5: training on 4000 x 6000 px images (2000 x 3000 scaled) "
                           "cannot fit: a batch of 4 needs at least")
    suggested = float(text.split("-s/--scale (about ")[1].split(" ")[0])
    assert 0 < suggested < 0.5
    preflight.check_scaled_memory(model, 4000, 6000, suggested, 3, 4, CPU, print, budget=budget)
    with pytest.raises(UserError):
        preflight.check_scaled_memory(model, 4000, 6000, suggested + 0.02, 3, 4, CPU, print, budget=budget)
    # room for 2.5 images of 100 x 100: a batch of 4 does not fit, a batch of 2 does
    per_image = (preflight.activation_bytes_per_pixel(model, 3, CPU, 100) + 27) * 100 * 100
    fixed = 4 * sum(p.numel() * 4 for p in model.parameters())
    room = (int(fixed + 2.5 * per_image), "RAM")
    with pytest.raises(UserError, match=r"or a smaller -b/--batch-size \(about 2\)"):
        preflight.check_scaled_memory(model, 100, 100, 1.0, 3, 4, CPU, print, budget=room)
    preflight.check_scaled_memory(model, 100, 100, 1.0, 3, 2, CPU, print, budget=room)
    # on CUDA one image must fit; the batch is left to out-of-memory recovery, with a notice
    notes = []
    preflight.check_scaled_memory(model, 100, 100, 1.0, 3, 4, CPU, notes.append, budget=room, recovers=True)
    assert len(notes) == 1 and "a batch of 4 at 100 x 100 px" in notes[0]


def test_train_unet_refuses_a_scale_that_cannot_fit_before_decoding_the_images(tmp_path, capsys, monkeypatch):
    import train_unet
    from common.data import segmentation as seg

    data = seg.make_shapes_dataset(tmp_path / "data", n=6, size=64)
    monkeypatch.setattr(preflight, "memory_budget", lambda device: (11 * 10**6, "of available RAM"))
    decoded = []
    real_getitem = seg.SegmentationDataset.__getitem__
    monkeypatch.setattr(seg.SegmentationDataset, "__getitem__",
                        lambda self, i: decoded.append(i) or real_getitem(self, i))
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--output", str(out), "-e", "1", "-b", "2", "--width", "8",
            "--num-workers", "0", "--data-cache", "off"]
    assert train_unet.main([*argv, "-s", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: -s/--scale 1.0: training on 64 x 64 px images")
    assert decoded == [] and not (out / "checkpoint.pth").exists()
    suggested = err[0].split("-s/--scale (about ")[1].split(" ")[0]
    assert train_unet.main([*argv, "-s", suggested]) == 0
