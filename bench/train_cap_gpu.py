"""The smallest allocator cap under which QLoRA training steps still run (bench/results/train_memory_h100_<date>.json,
"caps" and, with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "caps_expandable_segments").

    python3 bench/train_cap_gpu.py MODEL LAYERS VOCAB SEQ MICRO_BATCH GC DROPOUT   # after train_step_gpu.py w ...

Runs three steps uncapped for the allocated and reserved peaks, then bisects torch.cuda.set_per_process_memory_
fraction between them (16 MiB apart at the end), running two steps under each cap; prints one JSON line with the
smallest cap that ran ("need"). Run from the repository root. Written compact, as sent inline to a machine that
receives only the main checkout; this is the code that ran, with this docstring added.
"""
import sys,json,gc,torch
a=sys.argv;m,l,v=a[1],int(a[2]),int(a[3]);f=f'/tmp/{m}{l}{v}'
c=json.load(open(f'src/heavylift/data/models/{m}.json'))
V=v or c['vocab_size']
from transformers import AutoModelForCausalLM as M,BitsAndBytesConfig as B
import bitsandbytes as bnb
from peft import LoraConfig,get_peft_model as G,prepare_model_for_kbit_training as P
S,b,g,d=int(a[4]),int(a[5]),a[6]=='1',float(a[7])
q=B(load_in_4bit=True,bnb_4bit_quant_type='nf4',bnb_4bit_use_double_quant=True,bnb_4bit_compute_dtype=torch.bfloat16)
x=P(M.from_pretrained(f,quantization_config=q,dtype=torch.bfloat16,device_map={'':0}),use_gradient_checkpointing=g,gradient_checkpointing_kwargs={'use_reentrant':True})
x=G(x,LoraConfig(r=16,lora_alpha=32,lora_dropout=d,target_modules='all-linear',task_type='CAUSAL_LM'));x.train()
O=bnb.optim.PagedAdamW8bit([w for w in x.parameters() if w.requires_grad],lr=1e-4)
cu=torch.cuda;T=cu.mem_get_info()[1]
def st():
 ids=torch.randint(0,V,(b,S),device='cuda')
 with torch.autocast('cuda',dtype=torch.bfloat16):L=x(input_ids=ids,labels=ids).loss
 L.backward();del L;O.step();O.zero_grad(set_to_none=True);cu.synchronize()
def ok(C):
 O.zero_grad(set_to_none=True);gc.collect();cu.empty_cache();cu.set_per_process_memory_fraction(C/T)
 try:st();st();return 1
 except RuntimeError:pass
 return 0
st();st();cu.reset_peak_memory_stats();st();pk=cu.max_memory_allocated();rs=cu.max_memory_reserved()
lo,hi=pk-(64<<20),rs+(64<<20);r={'a':a[1:],'pk':pk,'rs':rs,'hi_ok':ok(hi)}
while hi-lo>(16<<20):
 C=(lo+hi)//2
 if ok(C):hi=C
 else:lo=C
r['need']=hi;print(json.dumps(r))
