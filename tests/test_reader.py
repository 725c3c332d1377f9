"""The reader (a plain nn.Module): normalisation, heads, box and digit-box heads, the zoom
geometry and where each crop is cut, compilation."""

import pytest
import torch
from helpers.logits import reading_logits

import svhn.model.reader
from svhn.data.labels import BLANK
from svhn.geometry import box_from_crop, crop_boxes, crop_region, leader_boxes, pairwise_iou
from svhn.model.reader import DigitHeads, DigitReader, search_windows
from svhn.model.training import DigitSequenceModel
from svhn.model.vote import vote


def test_reader_reads_without_lightning():
    reader = DigitReader(backbone="simple_cnn", max_len=4).eval()
    assert not any("lightning" in type(m).__module__ for m in reader.modules())
    with torch.no_grad():
        out = reader(torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8))
    assert set(out) == {"logits"} and out["logits"].shape == (2, 4, 11)


def test_crop_boxes_cuts_out_the_box_and_resamples_it():
    images = torch.zeros(2, 1, 40, 80)
    images[0, :, 10:20, 40:60] = 1.0  # a white block at x 0.5-0.75, y 0.25-0.5
    boxes = torch.tensor([[0.5, 0.25, 0.75, 0.5], [0.0, 0.0, 1.0, 1.0]])
    crops = crop_boxes(images, boxes, margin=0.0, output_size=(20, 40))
    assert crops.shape == (2, 1, 20, 40)
    assert crops[0, :, 2:-2, 2:-2].min() > 0.99  # inside the box: all block
    assert crops[1].abs().max().item() == 0.0  # an empty image stays empty


def test_crop_boxes_with_image_rows_cuts_many_boxes_from_one_image():
    images = torch.rand(2, 3, 40, 80)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.3, 0.0, 0.8, 0.5], [0.0, 0.1, 0.5, 0.6]])
    rows = torch.tensor([1, 1, 0])
    crops = crop_boxes(images, boxes, 0.1, (16, 32), image_rows=rows)
    one_by_one = crop_boxes(images[rows], boxes, 0.1, (16, 32))
    torch.testing.assert_close(crops, one_by_one)


# All 4 chains' 8 crops in one read (a GPU's default, and a CPU's: 128), or 5 at a time.
@pytest.mark.parametrize("crops_per_read, reads_per_step", [(2048, [8]), (5, [5, 3]),
                                                            (None, [8])])
def test_zoom_chains_side_by_side_equal_the_chains_one_by_one(crops_per_read,
                                                              reads_per_step):
    torch.manual_seed(0)
    reader = DigitReader(backbone="resnet18d", max_len=3, head="detector", box_head=True,
                         char_boxes=True, zoom_from="digits", zoom_steps=2,
                         image_size=(32, 64), zoom_search=True).eval()
    reader.search_crops_per_read = crops_per_read
    images = reader.normalize(torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8))
    starts = [torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]]),
              *reader.window_starts(2, [0, 13, 26])]
    reads = []
    original = reader.read
    reader.read = lambda crops: reads.append(len(crops)) or original(crops)
    with torch.no_grad():
        together = reader.zoom_chains(images, starts)
        assert reads == reads_per_step * 2  # 2 zoom steps
        alone = [reader.zoom_chain(images, start) for start in starts]
    assert len(together) == len(starts)
    for side_by_side, own in zip(together, alone, strict=True):
        assert side_by_side.keys() == own.keys() == {"logits", "box", "char_boxes"}
        for key in own:
            torch.testing.assert_close(side_by_side[key], own[key], atol=1e-4, rtol=1e-4)


def test_leader_boxes_lets_a_box_follow_the_first_earlier_leader_it_overlaps():
    a, near_a, far = [0.1, 0.1, 0.5, 0.9], [0.1, 0.1, 0.5, 0.87], [0.6, 0.1, 0.9, 0.9]
    near_near_a = [0.1, 0.1, 0.5, 0.84]  # IoU 0.96 with near_a, 0.93 with a
    boxes = torch.tensor([[a, far], [near_a, far], [far, a], [near_near_a, near_a]])
    leaders, follows = leader_boxes(boxes, min_iou=0.95)  # (K=4 chains, B=2 images)
    # Image 0: a leads, near_a follows it, far leads, near_near_a overlaps only near_a (a
    # follower) by 0.95: it leads. Image 1: far leads, far again follows, a leads, near_a
    # follows a.
    flat = [k * 2 + b for k, b in [(0, 0), (0, 1), (2, 0), (2, 1), (3, 0)]]
    assert leaders.tolist() == flat
    leader_of = [(0, 0), (0, 1), (0, 0), (0, 1), (2, 0), (2, 1), (3, 0), (2, 1)]
    assert follows.tolist() == [flat.index(k * 2 + b) for k, b in leader_of]


def test_merged_chains_read_a_shared_box_once_and_follow_their_leader():
    torch.manual_seed(0)
    reader = DigitReader(backbone="resnet18d", max_len=3, head="detector", box_head=True,
                         char_boxes=True, zoom_from="digits", zoom_steps=2,
                         image_size=(32, 64), zoom_search=True).eval()
    images = reader.normalize(torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8))
    shared = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    starts = [shared, shared.clone(), torch.tensor([[0.5, 0.1, 0.9, 0.5]] * 2)]
    reads = []
    original = reader.read
    reader.read = lambda crops: reads.append(len(crops)) or original(crops)
    with torch.no_grad():
        merged = reader.zoom_chains(images, starts, merge_iou=0.9)
        first_step, crops_merged = reads[0], sum(reads)
        reads.clear()
        own = reader.zoom_chains(images, starts)
    # Per image: the shared start read once, the other start once; the same at step 2 at
    # most (the other chain may join the shared one), against 3 reads per step unmerged.
    assert first_step == 2 * 2 and crops_merged <= 2 * 2 * 2 < sum(reads) == 3 * 2 * 2
    for key in own[0]:
        torch.testing.assert_close(merged[1][key], merged[0][key])  # the follower
        torch.testing.assert_close(merged[0][key], own[0][key])  # a leader: as unmerged
        torch.testing.assert_close(merged[1][key], own[1][key])  # the same start anyway


def test_a_merged_chain_that_found_the_box_it_read_reads_no_more():
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, zoom_steps=3,
                         image_size=(32, 64)).eval()
    margin = reader.zoom_margin
    # Every read finds its box where it was cut: the box inside its own grown crop.
    inside = torch.tensor([[margin, margin, 1 + margin, 1 + margin]]) / (1 + 2 * margin)
    reads = []

    def fake_read(crops):
        reads.append(len(crops))
        return {"logits": torch.zeros(len(crops), 3, 11), "box": inside.expand(len(crops), 4)}

    reader.read = fake_read
    images = torch.rand(2, 3, 64, 128)
    starts = [torch.tensor([[0.3, 0.3, 0.7, 0.7]] * 2), torch.tensor([[0.1, 0.2, 0.4, 0.6]] * 2)]
    merged = reader.zoom_chains(images, starts, merge_iou=0.9)
    assert reads == [4]  # the first step; then every chain had settled
    reads.clear()
    own = reader.zoom_chains(images, starts)
    assert reads == [4, 4, 4]
    for mine, theirs, start in zip(merged, own, starts, strict=True):
        torch.testing.assert_close(mine["box"], start)
        torch.testing.assert_close(mine["box"], theirs["box"])


def test_the_gated_search_merges_chains_and_the_full_search_never_does():
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, char_boxes=True,
                         zoom_from="digits", zoom_steps=2, image_size=(32, 64),
                         zoom_search=True, search_gate=1.0, search_merge=0.9).eval()
    merges = []
    chains = reader.zoom_chains
    reader.zoom_chains = lambda images, starts, merge_iou=None: merges.append(merge_iou) or \
        chains(images, starts, merge_iou)
    images = torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8)
    with torch.no_grad():
        reader(images)  # the full search: the reference, every chain its own crops
        assert merges == [None]
        merges.clear()
        reader.search_gate = 0.999  # a random net is unsure of every image: all searched
        out = reader(images)
    assert out["searched"].all() and merges == [0.9, 0.9]  # first two, then the windows


def test_uint8_batches_are_normalised_with_the_backbone_s_statistics():
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    resnet = DigitReader(backbone="resnet18")
    assert resnet.normalize(pixels)[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229,
                                                                         rel=1e-5)
    vit = DigitReader(backbone="vit_tiny_patch16_224", image_size=(224, 224))
    assert vit.normalize(pixels)[0, 0, 0, 0].item() == pytest.approx((1 - 0.5) / 0.5)
    floats = torch.randn(1, 3, 2, 2)
    assert resnet.normalize(floats) is floats  # floats are taken as already normalised


def test_zoom_reads_again_on_the_predicted_box_only_when_evaluating():
    reader = DigitReader(backbone="simple_cnn", box_head=True, zoom_steps=1,
                         image_size=(32, 64)).eval()
    with torch.no_grad():
        out = reader(torch.randint(0, 255, (3, 3, 64, 128), dtype=torch.uint8))
    assert out["logits"].shape == (3, 5, 11) and out["box"].shape == (3, 4)
    assert not torch.allclose(out["logits"], out["first_pass_logits"])
    reader.train()
    assert "first_pass_logits" not in reader(torch.zeros(2, 3, 32, 64))


def test_no_zoom_means_one_read_even_with_a_box_head():
    reader = DigitReader(backbone="simple_cnn", box_head=True, zoom_steps=0).eval()
    with torch.no_grad():
        out = reader(torch.zeros(1, 3, 64, 128))
    assert set(out) == {"logits", "box"}


def test_a_box_predicted_in_a_crop_maps_back_to_the_whole_image():
    boxes = torch.tensor([[0.4, 0.2, 0.6, 0.4]])
    region = crop_region(boxes, margin=0.5)  # grown by half its size per side
    assert torch.allclose(region, torch.tensor([[0.3, 0.1, 0.7, 0.5]]))
    whole_crop = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(box_from_crop(whole_crop, region), region)
    middle = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    assert torch.allclose(box_from_crop(middle, region), boxes)


def test_crop_region_keeps_a_minimum_size_and_stays_inside_the_image():
    tiny_at_edge = torch.tensor([[0.99, 0.0, 1.0, 0.01]])
    region = crop_region(tiny_at_edge, margin=0.0, min_size=0.1)
    assert (region >= 0).all() and (region <= 1).all()
    assert region[0, 3].item() == pytest.approx(0.055)  # centre 0.005 + half of 0.1
    assert region[0, 0].item() == pytest.approx(0.945)  # centre 0.995 - 0.05, then clipped


def test_each_zoom_step_crops_around_the_box_the_last_crop_found(monkeypatch):
    reader = DigitReader(backbone="simple_cnn", box_head=True, zoom_steps=3, zoom_margin=0.0,
                         image_size=(32, 64)).eval()
    # Every read says "the digits are in the left half of what I see", so each crop should
    # be the left half of the previous one: widths 1/2, 1/4, 1/8 of the image.
    reads, cropped_around = [], []

    def fake_read(images):
        reads.append(images.shape)
        return {"logits": torch.full((len(images), 5, 11), float(len(reads))),
                "box": torch.tensor([[0.0, 0.0, 0.5, 1.0]]).expand(len(images), 4)}

    def recording_crop(images, boxes, *args, **kwargs):
        cropped_around.append(boxes.clone())
        return crop_boxes(images, boxes, *args, **kwargs)

    monkeypatch.setattr(reader, "read", fake_read)
    monkeypatch.setattr(svhn.model.reader, "crop_boxes", recording_crop)
    out = reader(torch.zeros(1, 3, 32, 64))
    assert len(reads) == 4  # the whole image, then three crops
    assert out["logits"].max() == 4 and out["first_pass_logits"].max() == 1
    widths = [box[0, 2].item() for box in cropped_around]
    assert widths == pytest.approx([0.5, 0.25, 0.125])
    assert torch.allclose(out["box"], torch.tensor([[0.0, 0.0, 0.0625, 1.0]]))


def test_zoom_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="zoom_steps must be 0"):
        DigitReader(box_head=True, zoom_steps=-1)


def test_zoom_without_box_head_is_an_error_naming_the_overlay():
    with pytest.raises(ValueError, match="needs box_head.*configs/zoom.yaml"):
        DigitReader(zoom_steps=2)


def test_channels_last_reader_keeps_weights_channels_last():
    reader = DigitReader(backbone="resnet18", channels_last=True)
    weight = next(p for p in reader.backbone.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("head", ["positions", "detector"])
def test_a_compiled_backbone_reads_like_the_eager_one_and_keeps_plain_weight_names(
        monkeypatch, head):
    # A real torch.compile wrapper (dynamo), with the eager backend: inductor's C++ build
    # takes minutes on 2 cores. The wrapper is what refuses len() (and so "or").
    real_compile = torch.compile
    compiled_calls = []

    def compile_eagerly(module):
        wrapper = real_compile(module, backend="eager")
        wrapper.register_forward_pre_hook(lambda *_: compiled_calls.append(1))
        return wrapper

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch.manual_seed(0)
    reader = DigitReader(backbone="resnet18", image_size=(32, 64), head=head,
                         char_boxes=head == "detector").eval()
    names = set(reader.state_dict())
    images = torch.randint(0, 255, (2, 3, 32, 64), dtype=torch.uint8)
    with torch.no_grad():
        eager = reader(images)["logits"]
        reader.compile_backbone()
        compiled = reader(images)["logits"]
    assert reader.compiled_backbone is not None and compiled_calls  # it ran, compiled
    torch.testing.assert_close(compiled, eager)
    assert set(reader.state_dict()) == names


def test_zoom_from_digits_cuts_around_the_digits_the_heads_read():
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, char_boxes=True,
                         zoom_from="digits", zoom_steps=1, image_size=(32, 64))
    logits = torch.full((2, 3, 11), -5.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, BLANK] = 5  # "12"
    logits[1, :, BLANK] = 5  # nothing read
    chars = torch.tensor([[0.1, 0.2, 0.3, 0.8], [0.35, 0.25, 0.5, 0.7], [0.6, 0.1, 0.9, 0.9]])
    box = torch.tensor([[0.05, 0.05, 0.95, 0.95]]).repeat(2, 1)
    out = {"logits": logits, "char_boxes": chars.expand(2, 3, 4), "box": box}
    zoom = reader.zoom_box(out)
    torch.testing.assert_close(zoom[0], torch.tensor([0.1, 0.2, 0.5, 0.8]))
    torch.testing.assert_close(zoom[1], box[1])  # no digit read: the box head's box
    reader.zoom_from = "box"
    torch.testing.assert_close(reader.zoom_box(out), box)


def test_zoom_from_digits_without_digit_boxes_is_refused():
    with pytest.raises(ValueError, match="char_boxes"):
        DigitReader(box_head=True, zoom_from="digits", zoom_steps=1)
    with pytest.raises(ValueError, match="zoom_from"):
        DigitReader(box_head=True, char_boxes=True, zoom_from="centre", zoom_steps=1)


def test_zoom_reader_reports_digit_boxes_in_whole_image_coordinates():
    torch.manual_seed(0)
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, char_boxes=True,
                         zoom_from="digits", zoom_steps=2, image_size=(32, 64)).eval()
    with torch.no_grad():
        out = reader(torch.randint(0, 255, (4, 3, 64, 128), dtype=torch.uint8))
    assert out["char_boxes"].shape == (4, 3, 4)
    assert (out["char_boxes"] >= 0).all() and (out["char_boxes"] <= 1).all()


def test_crop_boxes_samples_at_pixel_centres():
    # A horizontal ramp (value = column index): a crop of the whole image at its own size
    # reads each pixel's own value; a half-pixel misalignment (roi_align without
    # aligned=True) would shift every crop the zoom reads by half a pixel.
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 3, 16, 32).contiguous()
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    crop = crop_boxes(ramp, whole, margin=0.0, output_size=(16, 32))
    torch.testing.assert_close(crop[..., 1:-1], ramp[..., 1:-1], atol=1e-4, rtol=0)


def test_a_shrinking_crop_averages_two_by_two_bilinear_samples_per_output_pixel():
    # When a crop is read smaller than it is (the zoom's first crops of a 2x image), each
    # output pixel is the mean of 2x2 bilinear samples spread over its cell, as training's
    # crops were made; on noise, any other sampling (adaptive, 3x3, one sample) differs.
    torch.manual_seed(0)
    height, width, out_h, out_w = 40, 60, 4, 6
    image = torch.rand(1, 1, height, width)
    box = torch.tensor([[0.1, 0.1, 0.9, 0.9]])  # pixels 6..54 x 4..36: 8-pixel cells
    x0, y0, x1, y1 = 6.0, 4.0, 54.0, 36.0
    offsets = torch.tensor([0.25, 0.75])  # two samples per cell side, at its quarters
    xs = x0 + (torch.arange(out_w)[:, None] + offsets) * (x1 - x0) / out_w - 0.5
    ys = y0 + (torch.arange(out_h)[:, None] + offsets) * (y1 - y0) / out_h - 0.5
    # bilinear samples at pixel coordinates (pixel centres at integers, after aligned's -0.5)
    grid_x = (xs.flatten() / (width - 1)) * 2 - 1
    grid_y = (ys.flatten() / (height - 1)) * 2 - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)
    samples = torch.nn.functional.grid_sample(image, grid[None], mode="bilinear",
                                              align_corners=True)
    expected = samples.view(out_h, 2, out_w, 2).mean(dim=(1, 3))
    crop = crop_boxes(image, box, margin=0.0, output_size=(out_h, out_w))
    torch.testing.assert_close(crop[0, 0], expected, atol=1e-5, rtol=0)


def test_a_channels_last_reader_reads_as_the_channels_first_one():
    torch.manual_seed(0)
    plain = DigitReader(backbone="resnet18", image_size=(32, 64), box_head=True,
                        zoom_steps=1).eval()
    fast = DigitReader(backbone="resnet18", image_size=(32, 64), box_head=True,
                       zoom_steps=1, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    images = torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8)
    with torch.no_grad():
        expected, got = plain(images), fast(images)
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["box"], expected["box"], atol=1e-5, rtol=1e-5)


def test_the_first_read_resizes_larger_images_with_antialiasing(monkeypatch):
    # Evaluation images come at eval_scale (2x): the whole-image read must downsample them
    # as training's resize did, with antialiasing, not by skipping pixels.
    calls = []
    real = svhn.model.reader.F.interpolate
    monkeypatch.setattr(svhn.model.reader.F, "interpolate",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    reader = DigitReader(backbone="simple_cnn", image_size=(32, 64)).eval()
    with torch.no_grad():
        reader(torch.randint(0, 255, (1, 3, 64, 128), dtype=torch.uint8))
    assert calls and calls[0]["size"] == (32, 64)
    assert calls[0]["antialias"] is True and calls[0]["align_corners"] is False


def test_heads_share_a_hidden_layer_only_when_asked():
    plain = DigitHeads(8, 2)
    assert isinstance(plain.shared, torch.nn.Identity) and plain.dropout.p == 0.0
    hidden = DigitHeads(8, 3, hidden_dim=16, dropout=0.25)
    layers = list(hidden.shared)
    assert [type(layer) for layer in layers] == [torch.nn.Dropout, torch.nn.Linear,
                                                  torch.nn.ReLU]
    assert layers[0].p == 0.25 and (layers[1].in_features, layers[1].out_features) == (8, 16)
    assert [head.in_features for head in hidden.heads] == [16, 16, 16]
    assert hidden.eval()(torch.randn(4, 8)).shape == (4, 3, 11)


def test_the_reader_s_dropout_reaches_its_heads():
    reader = DigitReader(backbone="simple_cnn", image_size=(32, 64), dropout=0.3,
                         hidden_dim=32)
    assert reader.heads.dropout.p == 0.3 and reader.heads.shared[0].p == 0.3


# -- zoom search: many chains, one vote -------------------------------------------------------
def same_place(chains: torch.Tensor) -> torch.Tensor:
    """(K, B, 4) boxes: every chain of every image ended on the same box."""
    return torch.tensor([0.2, 0.2, 0.6, 0.8]).expand(*chains.shape[:2], 4)


def test_the_vote_takes_the_reading_most_chains_agree_on_by_summed_probability():
    # Image 0: one confident chain reads "12"; two less sure chains read "7" (one with its
    # digit at the second position: the same reading once written). Together they win.
    # Image 1: the same chains read "5", "3" and "8": no two agree, the most probable wins.
    chains = torch.stack([
        reading_logits([[1, 2, BLANK], [5, BLANK, BLANK]], 0.9),
        reading_logits([[7, BLANK, BLANK], [3, BLANK, BLANK]], 0.75),
        reading_logits([[BLANK, 7, BLANK], [8, BLANK, BLANK]], 0.8),
    ])
    # chain probabilities: 0.9^3 = 0.73; 0.75^3 = 0.42 and 0.8^3 = 0.51 (sum 0.93)
    assert vote(chains, same_place(chains)).tolist() == [2, 0]  # the surer "7" chain
    assert vote(chains[:1], same_place(chains[:1])).tolist() == [0, 0]  # one chain: itself
    # A chain's weight is its reading's probability (the product over positions), not a
    # count or a sum: 0.9^3 = 0.73 beats two chains of 0.6^3 = 0.22 (sums: 2.7 vs 3.6).
    sure_or_two = torch.stack([reading_logits([[5, BLANK, BLANK]], 0.9),
                               reading_logits([[6, BLANK, BLANK]], 0.6),
                               reading_logits([[6, BLANK, BLANK]], 0.6)])
    assert vote(sure_or_two, same_place(sure_or_two)).tolist() == [0]


def test_chains_back_each_other_only_where_their_boxes_overlap():
    # Two chains read "7" in two unrelated places (0.6^3 = 0.22 each); two read "12" on the
    # same box (0.55^3 = 0.17 each). Counted anywhere, "7" would win (0.43 vs 0.33); only
    # the "12" chains agree on the place as well.
    chains = torch.stack([reading_logits([[7, BLANK, BLANK]], 0.6),
                          reading_logits([[7, BLANK, BLANK]], 0.6),
                          reading_logits([[1, 2, BLANK]], 0.55),
                          reading_logits([[1, 2, BLANK]], 0.55)])
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.3], [0.7, 0.6, 0.9, 0.9],
                          [0.3, 0.3, 0.6, 0.6], [0.32, 0.3, 0.6, 0.62]])[:, None]
    assert vote(chains, boxes).tolist() == [2]
    assert vote(chains, same_place(chains)).tolist() == [0]  # in one place "7" wins
    # Boxes sharing half their width back each other by their IoU, a third.
    iou = pairwise_iou(torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.0, 0.3, 0.2]])[:, None])
    torch.testing.assert_close(iou[:, :, 0], torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]))


def test_search_windows_cover_the_image_on_a_grid_at_three_sizes():
    windows = search_windows()
    assert windows.shape == (27, 4)
    assert (windows >= 0).all() and (windows <= 1).all()
    assert (windows[:, 2:] > windows[:, :2]).all()
    centres = ((windows[:, :2] + windows[:, 2:]) / 2).unique(dim=0)
    assert len(centres) > 9  # clipping moves the big windows' centres inwards
    widths = (windows[:, 2] - windows[:, 0]).unique()
    assert widths.min() < 0.35 and widths.max() > 0.65


def test_zoom_search_answers_with_the_chain_the_vote_picks():
    torch.manual_seed(0)
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, char_boxes=True,
                         zoom_from="digits", zoom_steps=2, image_size=(32, 64),
                         zoom_search=True, search_gate=1.0).eval()
    starts = []

    def fake_chain(images, start):
        # Chains that start in the left half of the image read "4" (confident); the rest
        # read "9"; each chain's box is its start, so the answer shows which chain won.
        starts.append(start.clone())
        left = ((start[:, 0] + start[:, 2]) / 2 < 0.5)[:, None, None]
        logits = torch.where(left, reading_logits([[4, BLANK, BLANK]] * len(images), 0.9),
                             reading_logits([[9, BLANK, BLANK]] * len(images), 0.9))
        return {"logits": logits, "box": start, "char_boxes": start[:, None].expand(-1, 3, 4)}

    reader.zoom_chain = fake_chain
    _chain_by_chain(reader)
    images = torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = reader(images)
    assert len(starts) == 2 + len(search_windows())  # digits box, box head's box, windows
    torch.testing.assert_close(torch.stack(starts[2:])[:, 0], search_windows())
    # 9 windows centred at x = 0.25 read "4"; the 18 others (and maybe the two predicted
    # boxes) read "9": "9" wins, answered by a chain that read it.
    assert out["logits"].argmax(-1)[:, 0].tolist() == [9, 9]
    assert ((out["box"][:, 0] + out["box"][:, 2]) / 2 >= 0.5).all()
    assert out["char_boxes"].shape == (2, 3, 4) and "first_pass_logits" in out
    # Every chain comes out too (for an ensemble's joint vote), the winner among them.
    chains, ends = out["chain_logits"], out["chain_boxes"]
    assert chains.shape == (2, 29, 3, 11) and ends.shape == (2, 29, 4)
    torch.testing.assert_close(ends[:, 2:], search_windows().expand(2, -1, -1))
    winner = vote(chains.transpose(0, 1), ends.transpose(0, 1))
    torch.testing.assert_close(out["logits"], chains[torch.arange(2), winner])
    starts.clear()
    with torch.no_grad():
        reader(images, search=False)
    assert len(starts) == 1  # one chain, from the digits the first read found


# The step is called outside a Trainer: its self.log has nowhere to go, which is the point.
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_validation_reads_one_chain_even_when_the_reader_searches():
    torch.manual_seed(0)
    model = DigitSequenceModel(backbone="simple_cnn", max_len=3, box_head=True,
                               zoom_steps=2, image_size=(32, 64), zoom_search=True,
                               search_gate=1.0).eval()
    reads = []
    original = model.reader.read
    model.reader.read = lambda images: reads.append(len(images)) or original(images)
    batch = {"image": torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8),
             "target": torch.tensor([[1, 2, BLANK], [3, BLANK, BLANK]]),
             "box": torch.tensor([[0.2, 0.2, 0.8, 0.8]] * 2)}
    with torch.no_grad():
        model.validation_step(batch, 0)
    assert len(reads) == 1 + 2  # the whole image and two crops
    reads.clear()
    with torch.no_grad():
        model.reader(batch["image"])
    # Predicting: the whole image, then every chain side by side, one read per zoom step.
    assert reads == [2] + [29 * 2] * 2


def _chain_by_chain(reader: DigitReader) -> None:
    """The search's batched ``zoom_chains`` as one ``reader.zoom_chain`` call per start, so
    a fake chain sees (and records) each chain on its own."""
    reader.zoom_chains = lambda images, starts, merge_iou=None: [
        reader.zoom_chain(images, start) for start in starts]


def _gated_reader(gate: float) -> tuple[DigitReader, list[int]]:
    """A searching reader whose chains are fake: the first two chains (from the digits and
    from the box head's box) read image 0 as a sure "4" (0.99 per position) and image 1 as
    an unsure "4" (0.6), in the same place; every window chain reads "7" (0.9). Returns
    the reader and the batch size each chain was called with."""
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, char_boxes=True,
                         zoom_from="digits", zoom_steps=2, image_size=(32, 64),
                         zoom_search=True, search_gate=gate).eval()
    sizes = []

    def fake_chain(images, start):
        sizes.append(len(images))
        if len(sizes) <= 2:  # the first two chains: one sure image, one unsure
            logits = torch.cat([reading_logits([[4, BLANK, BLANK]], 0.99),
                                reading_logits([[4, BLANK, BLANK]], 0.6)])[:len(images)]
        else:
            logits = reading_logits([[7, BLANK, BLANK]] * len(images), 0.9)
        box = torch.tensor([[0.3, 0.3, 0.7, 0.7]]).expand(len(images), 4)
        return {"logits": logits, "box": box, "char_boxes": box[:, None].expand(-1, 3, 4)}

    reader.zoom_chain = fake_chain
    _chain_by_chain(reader)
    return reader, sizes


def test_the_gated_search_searches_only_the_images_whose_first_chains_are_unsure():
    images = torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8)
    reader, sizes = _gated_reader(0.9)  # 0.99^3 = 0.97 is sure, 0.6^3 = 0.22 is not
    with torch.no_grad():
        out = reader(images)
    assert out["searched"].tolist() == [False, True]
    assert sizes == [2, 2] + [1] * 27  # the 27 window chains read only the unsure image
    assert out["logits"].argmax(-1)[:, 0].tolist() == [4, 7]  # kept / voted
    # The unsearched image's chains: its two, then its answer in the windows' places, so
    # ensembles still vote over 29 chains per member; the searched one's are its own.
    chains = out["chain_logits"]
    assert chains.shape == (2, 29, 3, 11)
    assert chains[0].argmax(-1)[:, 0].eq(4).all()
    assert chains[1, 2:].argmax(-1)[:, 0].eq(7).all()


def test_two_first_chains_that_disagree_are_searched_however_sure():
    images = torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8)
    reader, sizes = _gated_reader(0.0)  # no image is unsure by its confidence
    chain = reader.zoom_chain

    def second_reads_otherwise(images, start):
        out = chain(images, start)
        if len(sizes) == 2:  # the box head's chain reads image 0 as "1"
            out["logits"] = torch.cat([reading_logits([[1, BLANK, BLANK]], 0.99),
                                       out["logits"][1:]])
        return out

    reader.zoom_chain = second_reads_otherwise
    with torch.no_grad():
        out = reader(images)
    assert out["searched"].tolist() == [True, False]
    assert sizes == [2, 2] + [1] * 27


@pytest.mark.parametrize("gate, searched", [(1.0, [True, True]), (0.0, [False, False])])
def test_gate_one_searches_every_image_and_gate_zero_only_where_chains_disagree(gate,
                                                                                searched):
    images = torch.randint(0, 255, (2, 3, 64, 128), dtype=torch.uint8)
    reader, sizes = _gated_reader(gate)
    with torch.no_grad():
        out = reader(images)
    assert out["searched"].tolist() == searched
    assert sizes == [2, 2] + ([2] * 27 if all(searched) else [])  # none: no window chain
    expected = [7, 7] if all(searched) else [4, 4]
    assert out["logits"].argmax(-1)[:, 0].tolist() == expected


def _two_step_reader(majority: float | None) -> tuple[DigitReader, list[int]]:
    """A searching reader (gate 0.9) whose chains are fake and read by image: image i is
    the constant i. Its first two chains read image 0 as a sure "4", images 1 and 2 as an
    unsure "4", all in one place. Window chains: image 1 reads "7" everywhere; image 2
    reads "7", "3", "2" in turn across the 9 middle-size windows (no majority) and "3"
    in the other 18. Returns the reader and the batch size each chain was called with."""
    reader = DigitReader(backbone="simple_cnn", max_len=3, box_head=True, char_boxes=True,
                         zoom_from="digits", zoom_steps=2, image_size=(32, 64),
                         zoom_search=True, search_gate=0.9,
                         search_majority=majority).eval()
    reader.normalize = lambda images: images.float()  # keeps each image's number
    windows = search_windows()
    sizes = []

    def reading(image: int, window: int | None) -> list[int]:
        if window is None:
            return [4, BLANK, BLANK]
        if image == 1:
            return [7, BLANK, BLANK]
        middle = 9 <= window < 18
        return [(7, 3, 2)[window % 3] if middle else 3, BLANK, BLANK]

    def fake_chain(images, start):
        sizes.append(len(images))
        match = (windows - start[0]).abs().sum(1)
        window = int(match.argmin()) if match.min() < 1e-6 else None
        ids = images[:, 0, 0, 0].long().tolist()
        sure = [0.99 if window is None and image == 0 else 0.6 if window is None else 0.9
                for image in ids]
        logits = torch.cat([reading_logits([reading(image, window)], confidence)
                            for image, confidence in zip(ids, sure, strict=True)])
        box = torch.tensor([[0.3, 0.3, 0.7, 0.7]]).expand(len(images), 4)
        return {"logits": logits, "box": box, "char_boxes": box[:, None].expand(-1, 3, 4)}

    reader.zoom_chain = fake_chain
    _chain_by_chain(reader)
    return reader, sizes


def test_the_two_step_search_runs_the_other_windows_only_where_the_vote_is_split():
    images = torch.arange(3).view(3, 1, 1, 1).expand(3, 3, 64, 128).to(torch.uint8)
    reader, sizes = _two_step_reader(0.5)
    with torch.no_grad():
        out = reader(images)
    assert out["searched"].tolist() == [False, True, True]
    # The first two chains on all three, the 9 middle windows on the two unsure images,
    # the other 18 only on image 2, whose 11 chains held no majority.
    assert sizes == [3, 3] + [2] * 9 + [1] * 18
    assert out["logits"].argmax(-1)[:, 0].tolist() == [4, 7, 3]
    chains = out["chain_logits"].argmax(-1)[..., 0]
    assert chains.shape == (3, 29)
    assert chains[1, 2:].eq(7).all()  # its 9 windows, and its answer in the 18 not run
    # Image 2 went the whole way: its answer and chains are the full search's.
    full, full_sizes = _two_step_reader(None)
    with torch.no_grad():
        reference = full(images)
    assert full_sizes == [3, 3] + [2] * 27
    torch.testing.assert_close(out["chain_logits"][2], reference["chain_logits"][2])
    torch.testing.assert_close(out["logits"][2], reference["logits"][2])
    assert reference["logits"].argmax(-1)[:, 0].tolist() == [4, 7, 3]


def test_a_majority_of_one_takes_every_split_vote_the_whole_way():
    images = torch.arange(3).view(3, 1, 1, 1).expand(3, 3, 64, 128).to(torch.uint8)
    reader, sizes = _two_step_reader(1.0)  # image 1's two unsure "4"s split its vote too
    with torch.no_grad():
        reader(images)
    assert sizes == [3, 3] + [2] * 9 + [2] * 18


@pytest.mark.parametrize("majority", [0.0, 1.5])
def test_a_majority_outside_zero_to_one_is_refused(majority):
    with pytest.raises(ValueError, match="search_majority"):
        DigitReader(box_head=True, zoom_steps=1, zoom_search=True, search_majority=majority)


@pytest.mark.parametrize("merge", [0.0, 1.5])
def test_a_merge_iou_outside_zero_to_one_is_refused(merge):
    with pytest.raises(ValueError, match=r"search_merge .*must be in \(0, 1\]"):
        DigitReader(box_head=True, zoom_steps=1, zoom_search=True, search_merge=merge)


def test_zoom_search_needs_zoom_steps():
    with pytest.raises(ValueError, match="zoom_search needs zoom_steps"):
        DigitReader(box_head=True, zoom_search=True)
