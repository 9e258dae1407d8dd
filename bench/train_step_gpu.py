"""One QLoRA training step's memory on a GPU, phase by phase (bench/results/train_memory_h100_<date>.json, "steps").

    python3 bench/train_step_gpu.py w MODEL LAYERS VOCAB          # a random bf16 checkpoint of a catalog shape, cut
                                                                  # to LAYERS layers (VOCAB 0: the model's own)
    python3 bench/train_step_gpu.py r MODEL LAYERS VOCAB SEQ MICRO_BATCH GC OPT DROPOUT TARGETS
        GC 1/0: gradient checkpointing; OPT p (PagedAdamW8bit) or a (torch AdamW); TARGETS all or e.g. q,v

Loads the checkpoint as heavylift's training recipe does (docs/training.md; the forward here keeps transformers'
default cache), runs three steps and prints one JSON line: per step the allocator's figures at the step's start,
after and at the peak of the forward, backward and optimizer step, the reserved peak, what the device holds
outside the allocator, and the bytes the forward saves for backward. Run from the repository root (it reads the
catalog's config.json files). Written compact, as sent inline to a machine that receives only the main checkout;
this is the code that ran, with this docstring added.
"""
import sys,json,torch
a=sys.argv;m,l,v=a[2],int(a[3]),int(a[4]);f=f'/tmp/{m}{l}{v}'
c=json.load(open(f'src/heavylift/data/models/{m}.json'));c['num_hidden_layers']=l
if v:c['vocab_size']=v
from transformers import AutoConfig as C,AutoModelForCausalLM as M,BitsAndBytesConfig as B
if a[1]=='w':
 with torch.device('cuda'):M.from_config(C.for_model(**c),dtype=torch.bfloat16).save_pretrained(f)
 sys.exit()
import bitsandbytes as bnb
from peft import LoraConfig,get_peft_model as G,prepare_model_for_kbit_training as P
S,b,g,o,d,t=int(a[5]),int(a[6]),a[7]=='1',a[8],float(a[9]),a[10]
q=B(load_in_4bit=True,bnb_4bit_quant_type='nf4',bnb_4bit_use_double_quant=True,bnb_4bit_compute_dtype=torch.bfloat16)
x=P(M.from_pretrained(f,quantization_config=q,dtype=torch.bfloat16,device_map={'':0}),use_gradient_checkpointing=g,gradient_checkpointing_kwargs={'use_reentrant':True})
T=['q','k','v','o','gate','up','down'] if t=='all' else t.split(',')
x=G(x,LoraConfig(r=16,lora_alpha=32,lora_dropout=d,target_modules=[s+'_proj' for s in T],task_type='CAUSAL_LM'));x.train()
p=[w for w in x.parameters() if w.requires_grad]
O=bnb.optim.PagedAdamW8bit(p,lr=1e-4) if o=='p' else torch.optim.AdamW(p,lr=1e-4)
cu=torch.cuda;A=cu.memory_allocated;X=cu.max_memory_allocated;R=cu.reset_peak_memory_stats
ow={w.untyped_storage().data_ptr() for w in x.parameters()}
r={'a':a[2:],'load':A(),'n':sum(w.numel() for w in p),'s':[]}
for i in range(3):
 ids=torch.randint(0,c['vocab_size'],(b,S),device='cuda');e={'st':A()};R();h={}
 def pk(z):
  s=z.untyped_storage();k=s.data_ptr()
  if k not in ow:h[k]=s.nbytes()
  return z
 with torch.autograd.graph.saved_tensors_hooks(pk,lambda z:z),torch.autocast('cuda',dtype=torch.bfloat16):L=x(input_ids=ids,labels=ids).loss
 cu.synchronize();e['f']=X();e['af']=A();e['sv']=sum(h.values());R();L.backward();del L;cu.synchronize();e['b']=X();e['ab']=A();R()
 O.step();O.zero_grad(set_to_none=True);cu.synchronize();e['o']=X();e['ao']=A();e['rs']=cu.max_memory_reserved();fr,tt=cu.mem_get_info();e['out']=tt-fr-cu.memory_reserved();r['s'].append(e)
print(json.dumps(r))
