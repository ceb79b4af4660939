//! Which file is a model's next shard, by its name alone.

/// The shard after `path` in a model split as "NAME-00001-of-00004.EXT"
/// (Hugging Face's safetensors and .bin shards, GGUF splits), with the same
/// padding; `None` for the last shard or a file not named so.
pub(super) fn next_shard(path: &str) -> Option<String> {
    let name_at = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[name_at..]
        .rfind('.')
        .map_or(path.len(), |i| name_at + i);
    let (stem, ext) = path.split_at(dot);
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, k) = head.rsplit_once('-')?;
    // Digits hold no '/': what matched lies in the file's own name.
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(k) || !digits(total) {
        return None;
    }
    let (k_n, total_n): (u64, u64) = (k.parse().ok()?, total.parse().ok()?);
    (k_n < total_n).then(|| format!("{prefix}-{:0w$}-of-{total}{ext}", k_n + 1, w = k.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_shard_is_named_like_this_one() {
        for (path, next) in [
            (
                "model-00001-of-00004.safetensors",
                Some("model-00002-of-00004.safetensors"),
            ),
            (
                "m/Qwen-7B/model-00009-of-00010.safetensors",
                Some("m/Qwen-7B/model-00010-of-00010.safetensors"),
            ),
            (
                "pytorch_model-1-of-12.bin",
                Some("pytorch_model-2-of-12.bin"),
            ),
            (
                "llama-00001-of-00003.gguf",
                Some("llama-00002-of-00003.gguf"),
            ),
            ("a-b-00099-of-00120", Some("a-b-00100-of-00120")),
            ("model-00004-of-00004.safetensors", None),
            ("model.safetensors", None),
            ("model-of-00004.safetensors", None),
            ("model--of-00004.safetensors", None),
            ("model-x1-of-00004.safetensors", None),
            ("model-00001-of-.safetensors", None),
            ("run-1-of-2/model.safetensors", None),
            (
                "model-99999999999999999999999-of-99999999999999999999999.bin",
                None,
            ),
            ("", None),
        ] {
            assert_eq!(next_shard(path).as_deref(), next, "{path}");
        }
    }
}
