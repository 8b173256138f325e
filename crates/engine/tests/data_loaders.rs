//! The dataset loaders on the real files installed by `scripts/fetch-data.sh`, plus synthetic
//! files for the error paths. Reference values (pixel values, sums, counts) were read with numpy
//! and Pillow from the same files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use diffguard_engine::data::{
    self, ColorMode, Dataset, FashionSplit, FolderOptions, PixelRange, Pixels,
};
use diffguard_engine::{EngineError, LabelId};

/// The data folder, or `None` (with a loud message) when `scripts/fetch-data.sh` has not run.
fn data_root(sub: &str) -> Option<PathBuf> {
    let dir = data::data_dir().join(sub);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: {} is missing; run scripts/fetch-data.sh",
            dir.display()
        );
        None
    }
}

fn class_counts(d: &Dataset) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for l in d.labels() {
        *m.entry(l.0).or_insert(0) += 1;
    }
    m
}

fn sum_u8(d: &Dataset, i: usize) -> u64 {
    d.image_u8(i).unwrap().iter().map(|&v| u64::from(v)).sum()
}

/// A scratch folder unique to this test process and `name`.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffguard-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn data_fashion_mnist_test_split() {
    let Some(dir) = data_root("fashion-mnist") else {
        return;
    };
    let test = data::fashion_mnist(&dir, FashionSplit::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.image_shape(), [1, 28, 28]);
    assert_eq!(test.class_names().len(), 10);
    assert!(class_counts(&test).values().all(|&c| c == 1000));
    assert_eq!(test.labels()[0], LabelId(9));
    // numpy on t10k-images: image 0 sums to 33456, pixel (14,14) is 110.
    assert_eq!(sum_u8(&test, 0), 33_456);
    assert_eq!(test.pixel(0, 0, 14, 14), Some(110.0 / 255.0));
}

#[test]
fn data_fashion_mnist_train_validation_split() {
    let Some(dir) = data_root("fashion-mnist") else {
        return;
    };
    let (dims, raw_labels) = data::read_idx(&dir.join("train-labels-idx1-ubyte.gz"), 1).unwrap();
    assert_eq!(dims, vec![60_000]);
    let labels: Vec<LabelId> = raw_labels.iter().map(|&l| LabelId(u32::from(l))).collect();
    let (train_idx, val_idx) = data::fashion_mnist_split_indices(&labels);
    assert_eq!((train_idx.len(), val_idx.len()), (55_000, 5_000));
    let mut all: Vec<usize> = train_idx.iter().chain(&val_idx).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        60_000,
        "train and validation must be disjoint and cover the file"
    );

    // Pinned: an independent implementation (blake3 in Python, `scripts/torch_twin.py`'s
    // `validation_indices`) gives the same split; every calibrated threshold depends on it.
    assert_eq!(val_idx[..6], [6, 27, 36, 41, 55, 61]);
    assert_eq!(val_idx.iter().sum::<usize>(), 148_947_780);

    let train = data::fashion_mnist(&dir, FashionSplit::Train).unwrap();
    let val = data::fashion_mnist(&dir, FashionSplit::Validation).unwrap();
    assert_eq!((train.len(), val.len()), (55_000, 5_000));
    assert!(class_counts(&train).values().all(|&c| c == 5_500));
    assert!(class_counts(&val).values().all(|&c| c == 500));
    // numpy on train-images: image 0 is an ankle boot (9), sum 76247, pixel (14,14) = 217.
    let (split, pos) = match train_idx.binary_search(&0) {
        Ok(p) => (&train, p),
        Err(_) => (&val, val_idx.binary_search(&0).unwrap()),
    };
    assert_eq!(split.labels()[pos], LabelId(9));
    assert_eq!(sum_u8(split, pos), 76_247);
    assert_eq!(split.pixel(pos, 0, 14, 14), Some(217.0 / 255.0));
    // The split is a pure function of the labels: loading twice gives the same validation set.
    let again = data::fashion_mnist(&dir, FashionSplit::Validation).unwrap();
    assert_eq!(again, val);
}

#[test]
fn data_fashion_mnist_matches_foolbox_pngs() {
    // foolbox ships the first 20 Fashion-MNIST test images as PNGs: an independent decoder path.
    let (Some(fm), Some(fb)) = (data_root("fashion-mnist"), data_root("foolbox")) else {
        return;
    };
    let test = data::fashion_mnist(&fm, FashionSplit::Test).unwrap();
    let png = data::png_fixtures(&fb, "fashionMNIST").unwrap();
    assert_eq!(png.len(), 20);
    assert_eq!(png.image_shape(), [1, 28, 28]);
    for i in 0..20 {
        assert_eq!(png.labels()[i], test.labels()[i], "label of image {i}");
        assert_eq!(png.image_u8(i), test.image_u8(i), "pixels of image {i}");
    }
}

#[test]
fn data_mnist_json() {
    let Some(dir) = data_root("mnist/digits") else {
        return;
    };
    let m = data::mnist(&dir).unwrap();
    assert_eq!(m.len(), 10_000);
    assert_eq!(m.image_shape(), [1, 28, 28]);
    let counts: Vec<usize> = class_counts(&m).values().copied().collect();
    assert_eq!(
        counts,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    // 0.json starts "…,0.2,0.624,0.992,…" at row 4, columns 15..17 of the first digit.
    assert_eq!(
        m.image_u8(0).unwrap()[4 * 28 + 15..4 * 28 + 18],
        [51, 159, 253]
    );
    assert_eq!(sum_u8(&m, 0), 31_095);
    assert_eq!(sum_u8(&m, 9_999), 19_255);
    assert_eq!(m.labels()[9_999], LabelId(9));
}

#[test]
fn data_animal_mnist_pickle() {
    let Some(dir) = data_root("animal-mnist") else {
        return;
    };
    let a = data::animal_mnist(&dir).unwrap();
    assert_eq!(a.len(), 10_000);
    assert_eq!(a.image_shape(), [1, 28, 28]);
    assert!(class_counts(&a).values().all(|&c| c == 1000));
    assert_eq!(class_counts(&a).len(), 10);
    // pickle.load + numpy: image 0 sums to 48553, pixel (14,14) = 255; all pixels sum to 545386226.
    assert_eq!(sum_u8(&a, 0), 48_553);
    assert_eq!(a.pixel(0, 0, 14, 14), Some(1.0));
    let Pixels::U8(all) = a.pixels() else {
        panic!("u8 pixels expected")
    };
    assert_eq!(all.iter().map(|&v| u64::from(v)).sum::<u64>(), 545_386_226);
}

#[test]
fn data_cifar_fixtures() {
    let Some(dir) = data_root("foolbox") else {
        return;
    };
    let c10 = data::png_fixtures(&dir, "cifar10").unwrap();
    assert_eq!(c10.len(), 20);
    assert_eq!(c10.image_shape(), [3, 32, 32]);
    let labels: Vec<u32> = c10.labels().iter().map(|l| l.0).collect();
    assert_eq!(
        labels,
        [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    );
    // Pillow: cifar10_00_3.png pixel (0,0) = RGB(158,112,49), all values sum to 332962.
    let rgb: Vec<f32> = (0..3)
        .map(|c| c10.pixel(0, c, 0, 0).unwrap() * 255.0)
        .collect();
    assert_eq!(rgb, [158.0, 112.0, 49.0]);
    assert_eq!(sum_u8(&c10, 0), 332_962);
    let c100 = data::png_fixtures(&dir, "cifar100").unwrap();
    assert_eq!(c100.len(), 20, "cifar10 and cifar100 prefixes must not mix");
    assert_eq!(c100.labels()[19], LabelId(53));
}

#[test]
fn data_tensor_ranges_and_rgb() {
    let d = Dataset::new(
        "tiny",
        [1, 1, 2],
        Pixels::U8(vec![0, 255, 51, 102]),
        vec![LabelId(0), LabelId(1)],
        vec!["a".into(), "b".into()],
    )
    .unwrap();
    let t = d.to_tensor(PixelRange::MinusOneOne, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), [2, 1, 1, 2]);
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(
        v,
        [
            -1.0,
            1.0,
            51.0 / 255.0 * 2.0 - 1.0,
            102.0 / 255.0 * 2.0 - 1.0
        ]
    );
    let t = d
        .batch_tensor(&[1], PixelRange::ZeroOne, &Device::Cpu)
        .unwrap();
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [0.2, 0.4]
    );
    let rgb = d.to_rgb().unwrap();
    assert_eq!(rgb.image_shape(), [3, 1, 2]);
    assert_eq!(rgb.image_u8(1).unwrap(), [51, 102, 51, 102, 51, 102]);
    assert!(d.select(&[2]).is_err());
    assert!(
        Dataset::new(
            "bad",
            [1, 1, 2],
            Pixels::U8(vec![0; 3]),
            vec![LabelId(0)],
            vec!["a".into()]
        )
        .is_err()
    );
    let f32_pixels = |v: Vec<f32>| {
        Dataset::new(
            "f",
            [1, 1, 2],
            Pixels::F32(v),
            vec![LabelId(0)],
            vec!["a".into()],
        )
    };
    assert!(f32_pixels(vec![0.0, 1.5]).is_err());
    assert!(f32_pixels(vec![0.0, f32::NAN]).is_err());
    let f = f32_pixels(vec![0.25, 1.0]).unwrap();
    let t = f.to_tensor(PixelRange::MinusOneOne, &Device::Cpu).unwrap();
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [-0.5, 1.0]
    );
    assert_eq!(f.to_rgb().unwrap().pixel(0, 2, 0, 0), Some(0.25));
}

#[test]
fn data_stratified_subsets() {
    // 600 of class 0, 300 of class 1, 100 of class 2.
    let labels: Vec<LabelId> = (0..1000)
        .map(|i| {
            LabelId(if i % 10 < 6 {
                0
            } else if i % 10 < 9 {
                1
            } else {
                2
            })
        })
        .collect();
    let s = data::stratified_subset(&labels, 100, 7);
    assert_eq!(s.len(), 100);
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    let per: Vec<usize> = (0..3)
        .map(|c| s.iter().filter(|&&i| labels[i].0 == c).count())
        .collect();
    assert_eq!(per, [60, 30, 10]);
    assert_eq!(s, data::stratified_subset(&labels, 100, 7), "deterministic");
    assert_ne!(s, data::stratified_subset(&labels, 100, 8), "seed matters");
    // Largest remainder: 7 of 1000 → shares 4.2, 2.1, 0.7 → 4, 2, 1.
    let s7 = data::stratified_subset(&labels, 7, 7);
    let per: Vec<usize> = (0..3)
        .map(|c| s7.iter().filter(|&&i| labels[i].0 == c).count())
        .collect();
    assert_eq!(per, [4, 2, 1]);
    // A smaller subset is contained in a larger one.
    let big = data::stratified_subset(&labels, 500, 7);
    assert!(s.iter().all(|i| big.binary_search(i).is_ok()));
    assert_eq!(data::stratified_subset(&labels, 5000, 7).len(), 1000);
}

fn write_gz(path: &Path, bytes: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap();
}

#[test]
fn data_idx_errors_are_clear() {
    let dir = scratch("idx");
    let path = dir.join("x.gz");
    let cases: [(&[u8], &str); 4] = [
        (
            &[0, 0, 8, 1, 0, 0, 0, 3, 1, 2],
            "need 3 values, the file holds 2",
        ),
        (&[0, 1, 8, 1, 0, 0, 0, 1, 1], "magic"),
        (
            &[0, 0, 13, 1, 0, 0, 0, 1, 0, 0, 0, 0],
            "only unsigned bytes",
        ),
        (&[0, 0, 8, 3, 0, 0, 0, 1], "3 dimensions, expected 1"),
    ];
    for (bytes, needle) in cases {
        write_gz(&path, bytes);
        let err = data::read_idx(&path, 1).unwrap_err();
        assert!(
            matches!(err, EngineError::Format { .. }) && err.to_string().contains(needle),
            "{err}"
        );
    }
    write_gz(&path, &[0, 0, 8, 1, 0, 0, 0, 2, 7, 9]);
    assert_eq!(data::read_idx(&path, 1).unwrap(), (vec![2], vec![7, 9]));
    std::fs::write(&path, b"not gzip").unwrap();
    assert!(matches!(
        data::read_idx(&path, 1),
        Err(EngineError::Io { .. })
    ));
    let missing = data::fashion_mnist(&dir.join("nowhere"), FashionSplit::Test).unwrap_err();
    assert!(missing.to_string().contains("nowhere"), "{missing}");
}

#[test]
fn data_pickle_parser_validates() {
    let Some(dir) = data_root("animal-mnist") else {
        return;
    };
    use std::io::Read;
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(dir.join("animal_data_version_3.gz")).unwrap(),
    )
    .read_to_end(&mut raw)
    .unwrap();
    let arr = data::parse_ndarray_pickle(&raw).unwrap();
    assert_eq!(arr.shape, [10_000, 28, 28]);
    assert_eq!(arr.dtype, data::NdDtype::U8);
    // The BINBYTES opcode ('B') and its 4-byte length sit right before the blob.
    assert_eq!(arr.data.start, 150);
    assert_eq!(raw[145], b'B');
    // One byte short of the blob: the declared BINBYTES length overruns the file.
    let err = data::parse_ndarray_pickle(&raw[..raw.len() - 20]).unwrap_err();
    assert!(err.contains("truncated"), "{err}");
    // A shape that disagrees with the blob length is refused (10000 → 10001 in BININT2).
    let mut bad = raw.clone();
    let at = raw
        .windows(3)
        .position(|w| w == [b'M', 0x10, 0x27])
        .unwrap();
    bad[at + 1] = 0x11;
    let err = data::parse_ndarray_pickle(&bad).unwrap_err();
    assert!(err.contains("needs"), "{err}");
    let dir2 = scratch("pickle");
    write_gz(&dir2.join("animal_data_version_3.gz"), &bad);
    std::fs::copy(
        dir.join("animal_label_version_3.gz"),
        dir2.join("animal_label_version_3.gz"),
    )
    .unwrap();
    assert!(matches!(
        data::animal_mnist(&dir2),
        Err(EngineError::Format { .. })
    ));
}

#[test]
fn data_image_folder() {
    let root = scratch("folder");
    let write = |class: &str, name: &str, w: u32, v: u8| {
        std::fs::create_dir_all(root.join(class)).unwrap();
        image::GrayImage::from_pixel(w, 2, image::Luma([v]))
            .save(root.join(class).join(name))
            .unwrap();
    };
    write("zebra", "b.png", 3, 30);
    write("zebra", "a.png", 3, 20);
    write("ant", "x.png", 3, 10);
    std::fs::write(root.join("ant").join("notes.txt"), "ignored").unwrap();
    let d = data::image_folder(&root, &FolderOptions::default()).unwrap();
    assert_eq!(d.class_names(), ["ant", "zebra"]);
    assert_eq!(d.labels(), [LabelId(0), LabelId(1), LabelId(1)]);
    assert_eq!(d.image_shape(), [1, 2, 3]);
    let firsts: Vec<u8> = (0..3).map(|i| d.image_u8(i).unwrap()[0]).collect();
    assert_eq!(
        firsts,
        [10, 20, 30],
        "classes sorted, files sorted within a class"
    );
    let rgb = FolderOptions {
        color: ColorMode::Rgb,
        size: None,
    };
    assert_eq!(
        data::image_folder(&root, &rgb).unwrap().image_shape(),
        [3, 2, 3]
    );
    write("ant", "y.png", 5, 40);
    let err = data::image_folder(&root, &FolderOptions::default()).unwrap_err();
    assert!(err.to_string().contains("y.png"), "{err}");
    let resized = FolderOptions {
        color: ColorMode::Gray,
        size: Some((4, 4)),
    };
    let d = data::image_folder(&root, &resized).unwrap();
    assert_eq!((d.len(), d.image_shape()), (4, [1, 4, 4]));
    assert_eq!(
        d.image_u8(1).unwrap()[5],
        40,
        "a constant image stays constant"
    );
}

#[test]
fn data_fixed_split_is_pinned() {
    // The validation split and the evaluation subsets define every calibrated threshold and every
    // reported number: these indices pin them so an accidental change (seed, hash, ordering)
    // fails here rather than silently moving results.
    let Some(dir) = data_root("fashion-mnist") else {
        return;
    };
    let (_, raw) = data::read_idx(&dir.join("train-labels-idx1-ubyte.gz"), 1).unwrap();
    let labels: Vec<LabelId> = raw.iter().map(|&l| LabelId(u32::from(l))).collect();
    let (_, val_idx) = data::fashion_mnist_split_indices(&labels);
    assert_eq!(val_idx[..8], [6, 27, 36, 41, 55, 61, 68, 89]);
    let test = data::fashion_mnist(&dir, FashionSplit::Test).unwrap();
    let sub = test.stratified(1000, 0).unwrap();
    assert_eq!(sub.len(), 1000);
    assert!(class_counts(&sub).values().all(|&c| c == 100));
    let idx = data::stratified_subset(test.labels(), 1000, 0);
    assert_eq!(idx[..8], [6, 23, 24, 41, 45, 62, 85, 104]);
    assert_eq!(sub.image_u8(0), test.image_u8(idx[0]));
}
