//! The architectures request exactly the tensors of the official checkpoints (names, shapes,
//! parameter counts of torchvision's resnet50 and vgg16), checked without the files themselves.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use diffguard_engine::models::resnet::{ResNet, ResNetConfig};

/// Records every (name, shape) a model requests and hands out zeros.
#[derive(Default, Clone)]
struct Census(std::sync::Arc<std::sync::Mutex<Requests>>);

type Requests = Vec<(String, Vec<usize>)>;

impl SimpleBackend for Census {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn resnet50_requests_exactly_torchvisions_state_dict() {
    // torchvision resnet50(): 161 parameter tensors with 25,557,032 values, plus running_mean and
    // running_var of its 53 BatchNorms (num_batches_tracked is ignored by the loader).
    let census = Census::default();
    let vb = VarBuilder::from_backend(Box::new(census.clone()), DType::F32, Device::Cpu);
    ResNet::new(vb, &ResNetConfig::resnet50(1000)).unwrap();
    let names = census.0.lock().unwrap().clone();
    let is_stat = |n: &str| n.ends_with("running_mean") || n.ends_with("running_var");
    let params: Vec<_> = names.iter().filter(|(n, _)| !is_stat(n)).collect();
    assert_eq!(params.len(), 161);
    assert_eq!(names.len() - params.len(), 2 * 53);
    let count: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(count, 25_557_032);
    for (name, shape) in [
        ("conv1.weight", vec![64, 3, 7, 7]),
        ("layer1.0.downsample.0.weight", vec![256, 64, 1, 1]),
        ("layer3.5.bn3.running_var", vec![1024]),
        ("layer4.2.conv2.weight", vec![512, 512, 3, 3]),
        ("fc.weight", vec![1000, 2048]),
    ] {
        assert!(
            names.contains(&(name.to_string(), shape.clone())),
            "{name} {shape:?}"
        );
    }
}

#[test]
fn vgg16_features_request_torchvisions_names() {
    // torchvision vgg16().features: 13 convs at these indices, 14,714,688 parameters.
    let census = Census::default();
    let vb = VarBuilder::from_backend(Box::new(census.clone()), DType::F32, Device::Cpu);
    diffguard_engine::models::vgg::Dists::new(vb, &Default::default()).unwrap();
    let names = census.0.lock().unwrap().clone();
    let convs: Vec<usize> = names
        .iter()
        .filter_map(|(n, _)| {
            n.strip_prefix("features.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(convs, [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]);
    let features: usize = names
        .iter()
        .filter(|(n, _)| n.starts_with("features."))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(features, 14_714_688);
    assert!(names.contains(&("alpha".to_string(), vec![1, 1475, 1, 1])));
    assert!(names.contains(&("beta".to_string(), vec![1, 1475, 1, 1])));
}
