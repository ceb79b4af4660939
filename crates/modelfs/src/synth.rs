//! Synthetic safetensors models with the names, shapes and sharding of a
//! Llama-style checkpoint, filled with seeded pseudo-random bytes: the demo,
//! the tests and the benchmarks all load models made here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};

struct Spec {
    name: String,
    shape: Vec<usize>,
}

fn layer_specs(hidden: usize, inter: usize, layer: usize) -> Vec<Spec> {
    let p = format!("model.layers.{layer}");
    let sq = |n: &str, shape: Vec<usize>| Spec {
        name: format!("{p}.{n}"),
        shape,
    };
    vec![
        sq("input_layernorm.weight", vec![hidden]),
        sq("self_attn.q_proj.weight", vec![hidden, hidden]),
        sq("self_attn.k_proj.weight", vec![hidden / 4, hidden]),
        sq("self_attn.v_proj.weight", vec![hidden / 4, hidden]),
        sq("self_attn.o_proj.weight", vec![hidden, hidden]),
        sq("post_attention_layernorm.weight", vec![hidden]),
        sq("mlp.gate_proj.weight", vec![inter, hidden]),
        sq("mlp.up_proj.weight", vec![inter, hidden]),
        sq("mlp.down_proj.weight", vec![hidden, inter]),
    ]
}

fn bytes_of(s: &Spec) -> u64 {
    s.shape.iter().product::<usize>() as u64 * 2
}

/// Fills `buf` from a xorshift stream: fast, and the same for the same seed.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        c.copy_from_slice(&seed.to_le_bytes()[..c.len()]);
    }
}

/// Writes about `size` bytes of 16-bit tensors (`dtype` bf16 or f16) in
/// `files` shards under `dir`, with `model.safetensors.index.json` and
/// `config.json`; returns the shards.
pub fn make_model(
    dir: &Path,
    size: u64,
    files: usize,
    seed: u64,
    dtype: &str,
) -> Result<Vec<PathBuf>> {
    let dtype = match dtype {
        "bf16" => Dtype::BF16,
        // numpy has no bfloat16: f16 models load with safetensors' numpy API.
        "f16" => Dtype::F16,
        other => anyhow::bail!("--dtype {other}: use bf16 or f16"),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (hidden, inter, vocab) = if size >= 512 << 20 {
        (1024, 2816, 32000)
    } else {
        (256, 704, 4096)
    };
    let mut specs = vec![Spec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![vocab, hidden],
    }];
    let tail = [
        Spec {
            name: "model.norm.weight".into(),
            shape: vec![hidden],
        },
        Spec {
            name: "lm_head.weight".into(),
            shape: vec![vocab, hidden],
        },
    ];
    let fixed: u64 = bytes_of(&specs[0]) + tail.iter().map(bytes_of).sum::<u64>();
    let mut total = fixed;
    let mut layer = 0;
    loop {
        let l = layer_specs(hidden, inter, layer);
        let lb: u64 = l.iter().map(bytes_of).sum();
        if total + lb > size && layer > 0 {
            break;
        }
        total += lb;
        specs.extend(l);
        layer += 1;
    }
    specs.extend(tail);

    let files = files.max(1);
    let per_file = total.div_ceil(files as u64);
    let mut shards: Vec<Vec<&Spec>> = vec![vec![]];
    let mut in_shard = 0;
    for s in &specs {
        if in_shard >= per_file && shards.len() < files {
            shards.push(vec![]);
            in_shard = 0;
        }
        in_shard += bytes_of(s);
        shards.last_mut().unwrap().push(s);
    }
    let n = shards.len();
    let mut seed = seed | 1;
    let mut weight_map = BTreeMap::new();
    let mut out = vec![];
    for (k, shard) in shards.iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let datas: Vec<Vec<u8>> = shard
            .iter()
            .map(|s| {
                let mut v = vec![0u8; bytes_of(s) as usize];
                fill(&mut v, &mut seed);
                v
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = shard
            .iter()
            .zip(&datas)
            .map(|(s, d)| Ok((s.name.clone(), TensorView::new(dtype, s.shape.clone(), d)?)))
            .collect::<Result<_>>()?;
        let path = dir.join(&fname);
        safetensors::serialize_to_file(views, None, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        for s in shard {
            weight_map.insert(s.name.clone(), fname.clone());
        }
        out.push(path);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index)?,
    )?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layer, "vocab_size": vocab,
        "torch_dtype": if dtype == Dtype::F16 { "float16" } else { "bfloat16" }
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(out)
}
