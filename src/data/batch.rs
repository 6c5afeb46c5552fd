//! Batches for the trainer: right padding to the longest row of the batch, or packing several
//! examples into one row with per-example position ids and segment ids (the forward builds a
//! block-diagonal causal mask from them). The order of an epoch is a pure function of
//! (seed, epoch), so the iterator resumes exactly from a saved [`Position`].

use super::tokenize::TokenizedDataset;
use super::IGNORE_INDEX;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeSet;
use std::sync::Arc;

/// A batch of `batch` rows × `seq` tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids` (the consumer shifts); -100 = not trained (prompts, padding,
    /// and the first token of every packed example after a row's first).
    pub labels: Vec<i64>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Position within its own example (restarts at 0 for each packed example; 0 on padding).
    pub position_ids: Vec<u32>,
    /// Which example of the row a token belongs to: 1, 2, ... ; 0 = padding.
    pub segment_ids: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
    /// Dataset record indices of the examples in each row, in row order.
    pub examples: Vec<Vec<usize>>,
}

impl Batch {
    pub fn num_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    pub fn num_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }
}

#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Rows per batch (`per_device_train_batch_size`).
    pub batch_size: usize,
    pub seed: u64,
    /// Shuffle every epoch (from seed + epoch); false keeps dataset (or packing) order.
    pub shuffle: bool,
    /// Concatenate examples into rows of `max_seq_length` tokens (best-fit decreasing).
    pub packing: bool,
    /// Packed row length; default: the tokenized dataset's max_seq_length.
    pub max_seq_length: Option<usize>,
    /// Batch examples of similar length (transformers' `group_by_length`): less padding.
    pub group_by_length: bool,
    /// Drop the last incomplete batch of each epoch.
    pub drop_last: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { batch_size: 8, seed: 42, shuffle: true, packing: false, max_seq_length: None, group_by_length: false, drop_last: false }
    }
}

/// Where the iterator is: the next batch is batch `index` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: usize,
    pub index: usize,
}

pub struct BatchIterator {
    data: Arc<TokenizedDataset>,
    opts: BatchOptions,
    /// Rows: example indices (into `data.examples`) per row; one each unless packing.
    rows: Vec<Vec<usize>>,
    /// Row order of the current epoch, cut into batches.
    plan: Vec<Vec<usize>>,
    pos: Position,
    /// (rank, world size): each batch is this rank's rows of the global batch (data-parallel).
    shard: (usize, usize),
}

impl BatchIterator {
    pub fn new(data: Arc<TokenizedDataset>, opts: BatchOptions) -> Result<Self> {
        if opts.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        if data.is_empty() {
            bail!("the dataset has no examples to batch");
        }
        let rows = if opts.packing {
            let cap = opts.max_seq_length.or(data.max_seq_length).ok_or_else(|| anyhow::anyhow!("packing needs max_seq_length"))?;
            if cap == 0 {
                bail!("max_seq_length must be at least 1");
            }
            let lens: Vec<usize> = data.examples.iter().map(|e| e.len()).collect();
            if let Some((i, &l)) = lens.iter().enumerate().find(|(_, &l)| l > cap) {
                bail!("example {} has {l} tokens, more than the packed row length {cap}; tokenize with max_seq_length ≤ {cap}", data.examples[i].index);
            }
            pack(&lens, cap)
        } else {
            (0..data.len()).map(|i| vec![i]).collect()
        };
        let mut it = Self { data, opts, rows, plan: vec![], pos: Position::default(), shard: (0, 1) };
        it.plan = it.epoch_plan(0);
        if it.plan.is_empty() {
            bail!("no full batch of {} rows (drop_last with {} rows)", it.opts.batch_size, it.rows.len());
        }
        Ok(it)
    }

    /// Data-parallel: every batch is then rank `rank`'s share of the global batch of
    /// `batch_size` rows ([`crate::train::distributed::shard`]): the ranks' batches are disjoint,
    /// their union is the batch one process draws, the order and positions are the same.
    pub fn with_shard(mut self, rank: usize, world: usize) -> Self {
        self.shard = (rank, world.max(1));
        self
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    /// Rows per epoch (examples, or packed rows).
    pub fn rows_per_epoch(&self) -> usize {
        self.rows.len()
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    /// Continue from a saved position (the next batch is `pos.index` of `pos.epoch`).
    pub fn seek(&mut self, pos: Position) -> Result<()> {
        if pos.index > self.plan.len() {
            bail!("position {}:{} is past the {} batches of an epoch", pos.epoch, pos.index, self.plan.len());
        }
        if pos.epoch != self.pos.epoch {
            self.plan = self.epoch_plan(pos.epoch);
        }
        self.pos = pos;
        Ok(())
    }

    /// The next batch; epochs follow each other without end (the trainer counts steps).
    pub fn next_batch(&mut self) -> Batch {
        if self.pos.index >= self.plan.len() {
            self.pos = Position { epoch: self.pos.epoch + 1, index: 0 };
            self.plan = self.epoch_plan(self.pos.epoch);
        }
        let b = self.build_shard(&self.plan[self.pos.index]);
        self.pos.index += 1;
        b
    }

    /// Every batch of one epoch, in order.
    pub fn epoch(&self, epoch: usize) -> Vec<Batch> {
        self.epoch_plan(epoch).iter().map(|rows| self.build_shard(rows)).collect()
    }

    /// Row order of an epoch, cut into batches: a pure function of (seed, epoch).
    fn epoch_plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let bs = self.opts.batch_size;
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.opts.seed.wrapping_add(epoch as u64));
        if self.opts.shuffle {
            order.shuffle(&mut rng);
        }
        let row_len = |r: usize| -> usize { self.rows[r].iter().map(|&e| self.data.examples[e].len()).sum() };
        if self.opts.group_by_length {
            // transformers' LengthGroupedSampler: sort megabatches of 50 batches by length.
            for mega in order.chunks_mut(bs * 50) {
                mega.sort_by_key(|&r| std::cmp::Reverse(row_len(r)));
            }
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(bs).map(|c| c.to_vec()).collect();
        if self.opts.drop_last && batches.last().is_some_and(|b| b.len() < bs) {
            batches.pop();
        }
        if self.opts.group_by_length {
            // The longest batch first, so running out of memory happens at once.
            if let Some(i) = (0..batches.len()).max_by_key(|&i| (batches[i].iter().map(|&r| row_len(r)).max(), std::cmp::Reverse(i))) {
                batches.swap(0, i);
            }
        }
        batches
    }

    /// This rank's rows of a global batch.
    fn build_shard(&self, rows: &[usize]) -> Batch {
        let (rank, world) = self.shard;
        if world == 1 {
            return self.build(rows);
        }
        self.build(&rows[crate::train::distributed::shard(rows.len(), rank, world)])
    }

    fn build(&self, rows: &[usize]) -> Batch {
        let ex = &self.data.examples;
        let seq = rows.iter().map(|&r| self.rows[r].iter().map(|&e| ex[e].len()).sum::<usize>()).max().unwrap_or(0);
        let n = rows.len() * seq;
        let mut b = Batch {
            input_ids: vec![self.data.pad_id; n],
            labels: vec![IGNORE_INDEX; n],
            attention_mask: vec![0; n],
            position_ids: vec![0; n],
            segment_ids: vec![0; n],
            batch: rows.len(),
            seq,
            examples: Vec::with_capacity(rows.len()),
        };
        for (r, &row) in rows.iter().enumerate() {
            let mut at = r * seq;
            for (k, &e) in self.rows[row].iter().enumerate() {
                let x = &ex[e];
                for (p, (&id, &t)) in x.input_ids.iter().zip(&x.trained).enumerate() {
                    b.input_ids[at] = id;
                    // A later example's first token must not be learned from the previous one.
                    b.labels[at] = if t && !(k > 0 && p == 0) { id as i64 } else { IGNORE_INDEX };
                    b.attention_mask[at] = 1;
                    b.position_ids[at] = p as u32;
                    b.segment_ids[at] = k as u32 + 1;
                    at += 1;
                }
            }
            b.examples.push(self.rows[row].iter().map(|&e| ex[e].index).collect());
        }
        b
    }
}

impl Iterator for BatchIterator {
    type Item = Batch;

    /// Never `None`: epochs repeat (see [`BatchIterator::next_batch`]).
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// Best-fit decreasing bin packing (trl's default `bfd`): longest example first, each into the
/// fullest row it still fits. Deterministic; rows keep their examples in placement order.
pub fn pack(lens: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i]), i));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (free space, row): the first entry at or above (len, 0) is the best fit.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let l = lens[i];
        match free.range((l, 0)..).next().copied() {
            Some((room, row)) => {
                free.remove(&(room, row));
                rows[row].push(i);
                free.insert((room - l, row));
            }
            None => {
                rows.push(vec![i]);
                free.insert((cap - l, rows.len() - 1));
            }
        }
    }
    rows
}
