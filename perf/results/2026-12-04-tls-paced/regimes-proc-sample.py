import time,subprocess,os,sys
def intr():
    d={}
    for l in open('/proc/interrupts'):
        p=l.split()
        if p and p[0] in('RES:','CAL:','NET_RX','LOC:'):
            d[p[0]]=(int(p[1]),int(p[2]))
    return d
def stat():
    d={}
    for l in open('/proc/stat'):
        if l.startswith('cpu0') or l.startswith('cpu1'):
            p=l.split(); d[p[0]]=[int(x) for x in p[1:8]]
    return d
def lo():
    for l in open('/proc/net/dev'):
        if l.strip().startswith('lo:'):
            return int(l.split()[1])
def pidcpu(pid):
    try:
        p=open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()
        return int(p[11])+int(p[12])
    except: return 0
def ksoft():
    r={}
    for c in (0,1):
        try:
            pid=subprocess.check_output(['pgrep','-x',f'ksoftirqd/{c}']).split()[0].decode()
            r[c]=pidcpu(pid)
        except: r[c]=0
    return r
prev=None
while True:
    try: pid=subprocess.check_output(['pgrep','-nx','edgeproxy']).split()[0].decode()
    except: pid=None
    cur=(time.time(),intr(),stat(),lo(),pidcpu(pid) if pid else 0,ksoft(),pid)
    if prev and prev[6]==cur[6] and pid:
        dt=cur[0]-prev[0]
        i0,i1=prev[1],cur[1]
        s0,s1=prev[2],cur[2]
        idle=[ (s1[c][3]-s0[c][3])/dt for c in('cpu0','cpu1')]
        sirq=[ (s1[c][6]-s0[c][6])/dt for c in('cpu0','cpu1')]
        print(f"{time.strftime('%H:%M:%S')} lo {((cur[3]-prev[3])/dt/1e6):7.0f}MB/s proxy {(cur[4]-prev[4])/dt:4.0f}% idle {idle[0]:3.0f}/{idle[1]:3.0f} sirq {sirq[0]:3.0f}/{sirq[1]:3.0f} ksoft {(cur[5][0]-prev[5][0])/dt:3.0f}/{(cur[5][1]-prev[5][1])/dt:3.0f} RES {(i1['RES:'][0]-i0['RES:'][0])/dt:6.0f}/{(i1['RES:'][1]-i0['RES:'][1])/dt:6.0f} CAL {(i1['CAL:'][0]-i0['CAL:'][0])/dt:6.0f}/{(i1['CAL:'][1]-i0['CAL:'][1])/dt:6.0f}",flush=True)
    prev=cur
    time.sleep(1)
