//! Reading safetensors checkpoints (single file or sharded via `model.safetensors.index.json`)
//! through mmap, with errors that name the file and tensor.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → where it is (the header is parsed once: a 4-bit checkpoint has thousands
    /// of tensors, and re-parsing per lookup made loading quadratic)
    index: BTreeMap<String, Entry>,
}

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range of the data in the file's mapping.
    start: usize,
    end: usize,
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

impl WeightFiles {
    /// Open the weights of an HF model directory: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::open(&[single]);
        }
        if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", index.display(), e.line(), e.column()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing `weight_map`", index.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open(&paths);
        }
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
    }

    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the file is only read; a concurrent writer could change it under us, as with
            // every mmap-based loader (transformers included).
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e}); is it truncated?", path.display()))?;
            for (name, v) in st.tensors() {
                let start = v.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = Entry { file: i, dtype: v.dtype(), shape: v.shape().to_vec(), start, end: start + v.data().len() };
                index.insert(name, entry);
            }
            drop(st);
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Path of the file holding `name` (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|e| self.files[e.file].0.as_path())
    }

    /// Shape and dtype of a tensor without reading it.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, safetensors::Dtype)> {
        let (_, e, _) = self.view(name)?;
        Ok((e.shape.clone(), e.dtype))
    }

    /// The file, entry and mapped bytes of a tensor.
    fn view(&self, name: &str) -> Result<(&Path, &Entry, &[u8])> {
        let e = self.index.get(name).with_context(|| {
            let where_ = self.files.iter().map(|f| f.0.display().to_string()).collect::<Vec<_>>().join(", ");
            format!("{where_}: missing tensor `{name}`")
        })?;
        let (path, mmap) = &self.files[e.file];
        Ok((path, e, &mmap[e.start..e.end]))
    }

    /// Load a tensor, checking its shape when `expected` is given, converted to `dtype`.
    pub fn load(&self, name: &str, expected: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
        let (path, e, data) = self.view(name)?;
        if let Some(exp) = expected {
            if e.shape != exp {
                bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", path.display(), e.shape, exp);
            }
        }
        let src = st_dtype(e.dtype)
            .with_context(|| format!("{}: tensor `{name}` has unsupported dtype {:?}", path.display(), e.dtype))?;
        let t = self.copy_out(name, data, src, &e.shape).with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        let t = if src == dtype { t } else { t.to_dtype(dtype)? };
        Ok(t.to_device(device)?)
    }

    /// A tensor's dtype, shape and bytes exactly as stored (any dtype; for copying it on).
    pub fn raw(&self, name: &str) -> Result<(safetensors::Dtype, Vec<usize>, Vec<u8>)> {
        let (_, e, data) = self.view(name)?;
        let out = (e.dtype, e.shape.clone(), data.to_vec());
        self.release(name, data);
        Ok(out)
    }

    /// A tensor as stored (its own dtype and shape), on the CPU.
    pub fn load_stored(&self, name: &str) -> Result<Tensor> {
        let (path, e, data) = self.view(name)?;
        let src = st_dtype(e.dtype)
            .with_context(|| format!("{}: tensor `{name}` has unsupported dtype {:?}", path.display(), e.dtype))?;
        self.copy_out(name, data, src, &e.shape).with_context(|| format!("{}: tensor `{name}`", path.display()))
    }

    /// Copy a tensor's bytes out of the mapping into a CPU tensor, releasing the mapped pages
    /// chunk by chunk: at no point are both full copies resident (loading SmolLM2's 113 MB f32
    /// embedding would otherwise raise the peak by as much).
    fn copy_out(&self, name: &str, data: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        fn typed<T: candle_core::WithDType + Default>(w: &WeightFiles, name: &str, data: &[u8], shape: &[usize]) -> Result<Tensor> {
            let size = std::mem::size_of::<T>();
            anyhow::ensure!(data.len().is_multiple_of(size) && data.len() / size == shape.iter().product::<usize>(), "{} bytes do not hold shape {shape:?}", data.len());
            let mut v = vec![T::default(); data.len() / size];
            // SAFETY: T is a plain number type (no padding, every bit pattern valid); the byte
            // view covers exactly v's elements. safetensors stores little-endian, as this host.
            let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, data.len()) };
            for (d, s) in dst.chunks_mut(8 << 20).zip(data.chunks(8 << 20)) {
                d.copy_from_slice(s);
                w.release(name, s);
            }
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        }
        match dtype {
            DType::F32 => typed::<f32>(self, name, data, shape),
            DType::F16 => typed::<half::f16>(self, name, data, shape),
            DType::BF16 => typed::<half::bf16>(self, name, data, shape),
            DType::F64 => typed::<f64>(self, name, data, shape),
            DType::U8 => typed::<u8>(self, name, data, shape),
            DType::U32 => typed::<u32>(self, name, data, shape),
            DType::I64 => typed::<i64>(self, name, data, shape),
            other => bail!("unsupported dtype {other:?}"),
        }
    }

    /// Drop the mapped pages of bytes already copied out, so they stop counting in this
    /// process's resident memory (streaming loads keep peak RSS near the loaded model's size;
    /// the page cache keeps the file).
    fn release(&self, name: &str, data: &[u8]) {
        let Some(e) = self.index.get(name) else { return };
        let mmap = &self.files[e.file].1;
        let offset = data.as_ptr() as usize - mmap.as_ptr() as usize;
        // SAFETY: a read-only file mapping; MADV_DONTNEED only makes later reads fault the
        // pages in again from the file. Nothing borrows these bytes any more.
        #[cfg(unix)]
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
    }
}
