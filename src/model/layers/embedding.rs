//! Embedding lookup, for training (flat ids) and inference (`[b, t]` ids). The embedding is
//! frozen under LoRA, so training never calls the backward; it exists for completeness and is
//! tested like the others.

use anyhow::Result;
use candle_core::Tensor;

/// `ids` `[n]` (u32) → rows of `table` `[vocab, h]` → `[n, h]`.
pub fn forward(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(table.index_select(ids, 0)?)
}

/// [`forward`] for `ids` of any shape: `[..., h]` (inference's `[b, t]` → `[b, t, h]`).
pub fn lookup(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    Ok(forward(table, &ids.flatten_all()?)?.reshape(shape)?)
}

/// Gradient of the table: rows of `dy` `[n, h]` summed into their token's row.
pub fn backward(table: &Tensor, ids: &Tensor, dy: &Tensor) -> Result<Tensor> {
    Ok(table.zeros_like()?.index_add(ids, dy, 0)?)
}
