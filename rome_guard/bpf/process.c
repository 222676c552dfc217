/* Process lifecycle: exec with argv, fork, exit. Part of sensor.c.
 *
 * exec: sys_enter_execve(at) copies argv into exec_pending[tid] while the
 * caller's memory is still there; sched_process_exec (success only) adds
 * the resolved filename and emits one record; sys_exit_execve(at) drops the
 * entry of a failed exec, so failed PATH lookups cost no ring space. An
 * argument the kernel had not paged in yet cannot be read at entry; where
 * sched_prepare_exec exists (6.10+) it is read again there, else the record
 * says EXEC_ARGV_FAULT and user space falls back to /proc.
 *
 * fork: task:task_newtask, not sched_process_fork, because it carries the
 * clone flags: CLONE_THREAD children are threads and are not reported. The
 * parent recorded is the creating process (also under CLONE_PARENT, where
 * getppid() would name the grandparent: lineage follows who created it).
 *
 * exit: sched_process_exit fires per thread; a process has exited when its
 * last thread does (group_dead where the tracepoint has it, else when the
 * thread-group leader exits).
 *
 * fd: a dup/dup2/dup3/fcntl(F_DUPFD*) of an inet (AF_INET/AF_INET6) socket
 * whose result is 0, 1 or 2 is reported (checked at syscall exit: the result
 * is what happened, as in falco PR #2076). Whether the old descriptor is an
 * inet socket is read from the caller's own fd table when the running
 * kernel's BTF gives its offsets (HAVE_FD_TABLE, RG_OFF_* macros): however
 * the socket got there (socket(2), accept, inherited across fork or exec,
 * passed over SCM_RIGHTS, io_uring), and socket() and accept() are not
 * traced at all. Without BTF, socket(AF_INET/AF_INET6) results and
 * connections accepted on them are remembered per (process, fd), which
 * misses a socket the process did not make itself. Shell pipelines dup2
 * pipes onto 0-2 all day: they cost a few reads and no record. An fd record
 * always wakes user space: the process is judged again at once.
 *
 * rename: task:task_rename for the thread-group leader, outside exec (exec
 * renames every process to its file name; exec_pending tells them apart).
 * Like an exec, it wakes user space when the new name is one the rules
 * index (wake_names); else it is read at the next drain (10 ms at most).
 */

static __always_inline int capture_exec_args(const char *const *argv)
{
	__u64 argv_ptr = (__u64)argv;
	__u32 zero = 0;
	__u32 tid = current_tid();
	struct exec_record *rec = exec_scratch.lookup(&zero);
	const char *arg = NULL;
	/* 64-bit on purpose: 32-bit values get zero-extended copies whose
	 * bounds the verifier does not connect to the checks below */
	__u64 off = 0;
	__u64 i;

	if (!rec)
		return 0;
	rec->argc = 0;
	rec->args_count = 0;
	rec->args_size = 0;
	rec->filename_size = 0;
	rec->flags = 0;
	rec->args_cut = 0;

	for (i = 0; i < ARGV_MAX_ARGS; i++) {
		__u64 size;
		long n;

		if (bpf_probe_read_user(&arg, sizeof(arg),
					(const void *)((unsigned long)argv + i * sizeof(arg))) < 0) {
			rec->flags |= EXEC_ARGV_FAULT | EXEC_ARGV_TRUNCATED;
			goto store;
		}
		if (!arg) {
			rec->argc = i;
			goto store;
		}
		if (off >= ARGV_LIMIT)
			break; /* no room left: count the rest below */
		size = ARGV_LIMIT - off;
		if (size > ARG_MAX_LEN)
			size = ARG_MAX_LEN;
		n = bpf_probe_read_user_str(&rec->data[off], size, arg);
		if (n <= 0) {
			/* not paged in: keep the position, mark the argument cut */
			rec->data[off] = 0;
			n = 1;
			rec->args_cut |= 1ULL << i;
			rec->flags |= EXEC_ARGV_FAULT | EXEC_ARGV_TRUNCATED;
		} else if (n == size) {
			/* size-1 bytes fitted; cut unless the next byte ends it */
			char last = 1;

			bpf_probe_read_user(&last, 1, arg + size - 1);
			if (last) {
				rec->args_cut |= 1ULL << i;
				rec->flags |= EXEC_ARGV_TRUNCATED;
			}
		}
		off += n;
		rec->args_size = off;
		rec->args_count = i + 1;
	}

	/* stopped copying before the end: count what is left. The loop never
	 * compares i, so the verifier checks it once, not once per value of i. */
	{
		__u64 j;

		for (j = 0; j < ARGC_COUNT_MAX - ARGV_MAX_ARGS; j++) {
			if (bpf_probe_read_user(&arg, sizeof(arg),
						(const void *)((unsigned long)argv +
							       (i + j) * sizeof(arg))) < 0) {
				rec->flags |= EXEC_ARGV_FAULT;
				break;
			}
			if (!arg)
				break;
		}
		if (j == ARGC_COUNT_MAX - ARGV_MAX_ARGS)
			rec->flags |= EXEC_ARGC_CAPPED;
		rec->argc = i + j;
	}
	if (rec->argc > rec->args_count)
		rec->flags |= EXEC_ARGV_TRUNCATED;

store:
	/* A full table means the exec record will say EXEC_ARGV_MISSING. */
	exec_pending.update(&tid, rec);
#ifdef HAVE_PREPARE_EXEC
	/* Pages the kernel has not faulted in yet (string literals of a
	 * freshly forked child) are resident by sched_prepare_exec: retry. */
	if (rec->flags & EXEC_ARGV_FAULT)
		exec_retry.update(&tid, &argv_ptr);
#endif
	return 0;
}

int rgs_execve(struct tracepoint__syscalls__sys_enter_execve *args)
{
	return capture_exec_args(args->argv);
}

static __always_inline int drop_exec_state(void)
{
	__u32 tid = current_tid();

	exec_pending.delete(&tid);
	exec_retry.delete(&tid);
	return 0;
}

int rgs_execve_ret(struct tracepoint__syscalls__sys_exit_execve *args)
{
	return drop_exec_state();
}

#ifdef HAVE_EXECVEAT
int rgs_execveat(struct tracepoint__syscalls__sys_enter_execveat *args)
{
	return capture_exec_args(args->argv);
}

int rgs_execveat_rt(struct tracepoint__syscalls__sys_exit_execveat *args)
{
	return drop_exec_state();
}
#endif

#ifdef HAVE_PREPARE_EXEC
/* Still the old program (same tid, old memory), past the kernel's copy of
 * argv: a capture that faulted at syscall entry is redone here. */
int rgs_prep_exec(struct tracepoint__sched__sched_prepare_exec *args)
{
	__u32 tid = current_tid();
	__u64 *argv = exec_retry.lookup(&tid);

	if (!argv)
		return 0;
	exec_retry.delete(&tid);
	return capture_exec_args((const char *const *)*argv);
}
#endif

/* --- the process table ------------------------------------------------- */

/* A fresh entry for the current process, first met now (not at its fork). */
static __always_inline struct proc_entry *scratch_entry(__u32 pid)
{
	__u32 zero = 0;
	struct proc_entry *e = proc_scratch.lookup(&zero);

	if (!e)
		return NULL;
	__builtin_memset(e, 0, sizeof(*e));
	e->pid = pid;
	e->exit_code = -1;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

/* Insert value under pid; an old entry there (its exit went unseen) is
 * replaced. A full table is counted: that process stays untracked (its
 * records are sent, user space reads it from /proc). */
static __always_inline struct proc_entry *table_insert(__u32 pid, struct proc_entry *value)
{
	long ret = proc_live.insert(&pid, value);

	if (ret == 0)
		count_table(TABLE_LIVE_INSERTS);
	else if (ret == -RG_EEXIST)
		proc_live.update(&pid, value);
	else {
		count_table(TABLE_LIVE_FULL);
		return NULL;
	}
	return proc_live.lookup(&pid);
}

/* The child starts as a copy of its parent's image under its own identity. */
static __always_inline void table_fork(__u32 child_pid, __u64 now)
{
	__u32 ppid = bpf_get_current_pid_tgid() >> 32;
	struct proc_entry *parent = proc_live.lookup(&ppid);
	struct proc_entry *child;
	__u64 parent_start = 0;

	if (parent)
		parent_start = parent->start_ns;
	else
		parent = scratch_entry(ppid);
	if (!parent)
		return;
	child = table_insert(child_pid, parent);
	if (!child)
		return;
	child->pid = child_pid;
	child->ppid = ppid;
	child->start_ns = now;
	child->parent_start_ns = parent_start;
	child->exec_ns = 0;
	child->exit_ns = 0;
	child->exit_code = -1;
	child->flags = (child->flags & (PROC_EXEC_SEEN | PROC_ARGS_CUT)) | PROC_FORK_SEEN;
}

/* --- the exec filter ---------------------------------------------------- */

/* A name as (length, hash) without a branch or a variable offset (either
 * makes the verifier walk a scan once per way it can go): c is the next
 * byte, live whether it still belongs to the string. */
struct name_hash {
	__u64 hash;
	__u64 len;
};

static __always_inline void name_hash_add(struct name_hash *h, __u64 c, __u64 live)
{
	__u64 slash = byte_is(c, '/') * live;
	__u64 letter = live * (1 - slash) * (1 - byte_is(c, 0));
	__u64 keep = (1 - letter) * (1 - slash); /* a NUL or past the end: unchanged */

	h->hash = (h->hash * 131 + c + 1) * letter + h->hash * keep;
	h->len = (h->len + 1) * letter + h->len * keep;
}

/* argv[0]'s basename is not the exec'd file's (comm, already looked up):
 * a name user space looks up too, so the exec is sent (1). So is an
 * argv[0] longer than the scan, or a basename longer than comm holds. */
#define ARG0_SCAN 128
static __always_inline int arg0_differs(const struct exec_record *rec)
{
	struct name_hash arg0 = {}, comm = {};
	__u64 ended = 0, comm_ended = 0;
	__u32 i;

	if (rec->args_count == 0)
		return 0;
	for (i = 0; i < ARG0_SCAN; i++) {
		__u64 c = (__u8)rec->data[i];

		name_hash_add(&arg0, c, 1 - ended);
		ended |= byte_is(c, 0);
	}
	for (i = 0; i < TASK_COMM_LEN; i++) {
		__u64 c = (__u8)rec->hdr.comm[i];

		name_hash_add(&comm, c, 1 - comm_ended);
		comm_ended |= byte_is(c, 0);
	}
	return !ended || arg0.len != comm.len || arg0.hash != comm.hash;
}

/* One loop over the command line, in a program of its own (rgs_exec_scan,
 * reached by tail call): after rgs_exec's argv[0] loop the verifier would
 * walk it once per way that loop can end. */
static __always_inline int needles_match(const struct exec_record *rec)
{
	__u32 zero = 0;
	struct needle_dfa *dfa = needle_dfa.lookup(&zero);
	__u32 size = rec->args_size;
	__u32 state = 0;
	__u32 i;

	if (!dfa)
		return 1;
	if (size > NEEDLE_SCAN_MAX + 1)
		return 1;
	for (i = 0; i < NEEDLE_SCAN_MAX + 1; i++) {
		__u8 cls;

		if (i >= size)
			break;
		cls = dfa->classes[(__u8)rec->data[i]];
		state = dfa->next[(state & (NEEDLE_STATES - 1)) * NEEDLE_CLASSES +
				  (cls & (NEEDLE_CLASSES - 1))];
		if (state == NEEDLE_MATCH)
			return 1;
	}
	return 0;
}

/* exec'd through a descriptor (fexecve, a memfd): its name is not in argv */
static __always_inline int exec_via_fd(const struct exec_record *rec, __u64 name_off)
{
	char head[8] = {};

	if (name_off > ARGV_LIMIT)
		return 1;
	__builtin_memcpy(head, &rec->data[name_off], sizeof(head));
	return (head[0] == '/' && head[1] == 'd' && head[2] == 'e' && head[3] == 'v' &&
		head[4] == '/' && head[5] == 'f' && head[6] == 'd' && head[7] == '/') ||
	       (head[0] == '/' && head[1] == 'p' && head[2] == 'r' && head[3] == 'o' &&
		head[4] == 'c' && head[5] == '/');
}

/* Whether some rule may concern this exec by its names, or because argv
 * is not all there (the needles are scanned by rgs_exec_scan). */
static __always_inline int exec_wanted(const struct exec_record *rec, __u64 name_off)
{
	if (rec->flags & (EXEC_ARGV_MISSING | EXEC_ARGV_TRUNCATED | EXEC_ARGV_FAULT |
			  EXEC_FILENAME_TRUNCATED))
		return 1;
	if (name_wanted(rec->hdr.comm) || arg0_differs(rec))
		return 1;
	return exec_via_fd(rec, name_off);
}

/* The entry of the process that just exec'd: its new image. */
static __always_inline void table_exec(struct proc_entry *e, const struct exec_record *rec,
				       __u64 name_off)
{
	e->exec_ns = rec->hdr.timestamp_ns;
	e->uid = rec->hdr.uid;
	e->cgroup_id = rec->hdr.cgroup_id;
	__builtin_memcpy(e->comm, rec->hdr.comm, TASK_COMM_LEN);
	e->argc = rec->argc;
	e->args_size = rec->args_size < PROC_ARGS_MAX ? rec->args_size : PROC_ARGS_MAX;
	bpf_probe_read_kernel(e->args, PROC_ARGS_MAX, rec->data);
	if (name_off <= ARGV_LIMIT)
		bpf_probe_read_kernel_str(e->filename, PROC_FILENAME_MAX, &rec->data[name_off]);
	e->flags |= PROC_EXEC_SEEN;
	if (rec->args_size > PROC_ARGS_MAX || rec->argc > rec->args_count ||
	    (rec->flags & (EXEC_ARGV_MISSING | EXEC_ARGV_TRUNCATED)))
		e->flags |= PROC_ARGS_CUT;
	else
		e->flags &= ~PROC_ARGS_CUT;
}

/* Send the exec record (name_size bytes of filename after the arguments)
 * and drop its pending state; user space holds the process from now on. */
static __always_inline int send_exec(struct exec_record *rec, __u32 old_pid, int pending,
				     __u64 name_off, long name_size, int wanted)
{
	struct proc_entry *e = proc_live.lookup(&rec->hdr.pid);
	__u64 size;

	if (e)
		e->flags |= PROC_HELD;
	if (name_off > ARGV_LIMIT)
		name_off = ARGV_LIMIT;
	if (name_size < 0 || name_size > FILENAME_MAX_LEN)
		name_size = 0;
	size = offsetof(struct exec_record, data) + name_off + (__u64)name_size;
	if (size > sizeof(*rec))
		size = sizeof(*rec);
	if (process_events.ringbuf_output(rec, size, wanted_flags(wanted)) < 0)
		count_lost(LOST_PROCESS);
	if (pending)
		exec_pending.delete(&old_pid);
	exec_retry.delete(&old_pid);
	return 0;
}

int rgs_exec(struct tracepoint__sched__sched_process_exec *args)
{
	__u32 zero = 0;
	__u32 old_pid = args->old_pid;
	struct exec_record *rec = exec_pending.lookup(&old_pid);
	int pending = rec != NULL;
	struct proc_entry *e;
	unsigned short loc_off = args->data_loc_filename & 0xFFFF;
	unsigned short loc_len = args->data_loc_filename >> 16;
	__u64 off;
	int held, wanted;
	long n;

	if (!rec) {
		/* exec not seen at entry: started before us, a kernel-made
		 * exec (usermode helper), or exec_pending was full */
		rec = exec_scratch.lookup(&zero);
		if (!rec)
			return 0;
		rec->argc = 0;
		rec->args_count = 0;
		rec->args_size = 0;
		rec->args_cut = 0;
		rec->flags = EXEC_ARGV_MISSING;
	}
	fill_header(&rec->hdr, RECORD_EXEC);
	rec->old_pid = old_pid;

	off = rec->args_size;
	if (off > ARGV_LIMIT)
		off = ARGV_LIMIT;
	n = bpf_probe_read_kernel_str(&rec->data[off], FILENAME_MAX_LEN, (char *)args + loc_off);
	if (n < 0 || n > FILENAME_MAX_LEN)
		n = 0;
	if (loc_len > FILENAME_MAX_LEN)
		rec->flags |= EXEC_FILENAME_TRUNCATED;
	rec->filename_size = n;

	/* a process first met here predates the sensor (user space read it
	 * at start-up) or was not tracked: it is held */
	e = proc_live.lookup(&rec->hdr.pid);
	held = e == NULL;
	if (!e) {
		e = scratch_entry(rec->hdr.pid);
		if (e) {
			e->flags = PROC_HELD;
			e = table_insert(rec->hdr.pid, e);
		}
	}
	rec->ppid = 0;
	rec->start_ns = 0;
	rec->parent_start_ns = 0;
	if (e) {
		held = held || (e->flags & PROC_HELD);
		rec->ppid = e->ppid;
		if (e->flags & PROC_FORK_SEEN)
			rec->start_ns = e->start_ns;
		rec->parent_start_ns = e->parent_start_ns;
		table_exec(e, rec, off);
	}
	held = held || held_pids.lookup(&rec->hdr.pid) != NULL;
	wanted = exec_wanted(rec, off);
	if (!wanted && !held && exec_filter_on()) {
		struct exec_scan *scan = exec_scan_state.lookup(&zero);

		if (scan) {
			scan->old_pid = old_pid;
			scan->pending = pending;
			scan->name_off = off;
			scan->name_size = n;
			exec_tail.call(args, EXEC_TAIL_SCAN);
		}
		/* no scan program: sent, never guessed benign */
	}
	return send_exec(rec, old_pid, pending, off, n, wanted);
}

/* The needle scan of an exec rgs_exec could not send or drop on its own. */
int rgs_exec_scan(void *ctx)
{
	__u32 zero = 0;
	struct exec_scan *scan = exec_scan_state.lookup(&zero);
	struct exec_record *rec;
	__u32 old_pid;

	if (!scan)
		return 0;
	old_pid = scan->old_pid;
	rec = scan->pending ? exec_pending.lookup(&old_pid) : exec_scratch.lookup(&zero);
	if (!rec)
		return 0;
	if (needles_match(rec))
		return send_exec(rec, old_pid, scan->pending, scan->name_off, scan->name_size, 1);
	count_table(TABLE_EXECS_UNSENT);
	if (scan->pending)
		exec_pending.delete(&old_pid);
	exec_retry.delete(&old_pid);
	return 0;
}

int rgs_newtask(struct tracepoint__task__task_newtask *args)
{
	struct fork_record *r;
	__u32 child_pid = args->pid;
	__u64 now;

	if (args->clone_flags & RG_CLONE_THREAD)
		return 0;
	now = bpf_ktime_get_boot_ns();
	table_fork(child_pid, now);
	if (exec_filter_on()) {
		/* the child is in proc_live: user space reads it if it asks */
		count_table(TABLE_FORKS_UNSENT);
		return 0;
	}
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		return 0;
	}
	fill_header(&r->hdr, RECORD_FORK);
	r->hdr.timestamp_ns = now; /* the child's start_ns in proc_live */
	r->child_pid = child_pid;
	r->_pad = 0;
	r->clone_flags = args->clone_flags;
	process_events.ringbuf_submit(r, lifecycle_flags());
	return 0;
}

#ifdef HAVE_FD_TABLE
/* fd of the current process is an inet socket: its file in the fd table
 * (files->fdt->fd[fd]) is a socket (inode mode S_IFSOCK) whose sock's
 * family is AF_INET or AF_INET6. Every member offset is the running
 * kernel's (kernel/btf.py); any read that fails answers no. */
static __always_inline int fd_is_inet(__u64 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	void *files = NULL, *fdt = NULL, *fds = NULL, *file = NULL, *inode = NULL;
	void *sock_file = NULL, *sk = NULL;
	unsigned int max_fds = 0;
	__u16 mode = 0, family = 0;

	if (RG_READ(files, task, RG_OFF_TASK_FILES) || !files)
		return 0;
	if (RG_READ(fdt, files, RG_OFF_FILES_FDT) || !fdt)
		return 0;
	if (RG_READ(max_fds, fdt, RG_OFF_FDT_MAX_FDS) || fd >= max_fds)
		return 0;
	if (RG_READ(fds, fdt, RG_OFF_FDT_FD) || !fds)
		return 0;
	if (RG_READ(file, fds, fd * sizeof(void *)) || !file)
		return 0;
	if (RG_READ(inode, file, RG_OFF_FILE_INODE) || !inode)
		return 0;
	if (RG_READ(mode, inode, RG_OFF_INODE_MODE) || (mode & 0170000) != 0140000)
		return 0; /* not S_IFSOCK */
	if (RG_READ(sock_file, file, RG_OFF_FILE_PRIVATE_DATA) || !sock_file)
		return 0; /* a socket's file: private_data is its struct socket */
	if (RG_READ(sk, sock_file, RG_OFF_SOCKET_SK) || !sk)
		return 0;
	if (RG_READ(family, sk, RG_OFF_SKC_FAMILY))
		return 0;
	return family == RG_AF_INET || family == RG_AF_INET6;
}
#else
int rgs_socket(struct tracepoint__syscalls__sys_enter_socket *args)
{
	__u32 tid = current_tid();
	__u8 one = 1;

	if (args->family == RG_AF_INET || args->family == RG_AF_INET6)
		socket_pending.update(&tid, &one);
	return 0;
}

static __always_inline int remember_new_socket(long ret)
{
	__u32 tid = current_tid();
	struct fd_key key = {};
	__u8 one = 1;

	if (!socket_pending.lookup(&tid))
		return 0;
	socket_pending.delete(&tid);
	if (ret < 0)
		return 0;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = ret;
	inet_fds.update(&key, &one);
	return 0;
}

int rgs_socket_ret(struct tracepoint__syscalls__sys_exit_socket *args)
{
	return remember_new_socket(args->ret);
}

static __always_inline int fd_is_inet(__u64 fd)
{
	struct fd_key key = {};

	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = (__s32)fd;
	return inet_fds.lookup(&key) != NULL;
}

/* a connection accepted on a remembered inet listener is an inet socket
 * too: the bind shell dup2s it onto 0-2 */
static __always_inline int accept_enter(__u64 fd)
{
	__u32 tid = current_tid();
	__u8 one = 1;

	if (fd_is_inet(fd))
		socket_pending.update(&tid, &one);
	return 0;
}

#ifdef HAVE_ACCEPT
int rgs_accept(struct tracepoint__syscalls__sys_enter_accept *args)
{
	return accept_enter(args->fd);
}

int rgs_accept_ret(struct tracepoint__syscalls__sys_exit_accept *args)
{
	return remember_new_socket(args->ret);
}
#endif

int rgs_accept4(struct tracepoint__syscalls__sys_enter_accept4 *args)
{
	return accept_enter(args->fd);
}

int rgs_accept4_ret(struct tracepoint__syscalls__sys_exit_accept4 *args)
{
	return remember_new_socket(args->ret);
}
#endif /* HAVE_FD_TABLE */

static __always_inline int dup_enter(__u64 oldfd, __u64 newfd, __u32 via)
{
	struct dup_pending pending = {};
	__u32 tid = current_tid();

	if (newfd > 2)
		return 0; /* dup2/dup3 onto another descriptor: not stdio */
	if (!fd_is_inet(oldfd))
		return 0;
	pending.oldfd = (__s32)oldfd;
	pending.via = via;
	dup_pending.update(&tid, &pending);
	return 0;
}

static __always_inline int dup_exit(long ret)
{
	__u32 tid = current_tid();
	struct dup_pending *pending = dup_pending.lookup(&tid);
	struct fd_record *r;

	if (!pending)
		return 0;
	if (ret < 0 || ret > 2) {
		dup_pending.delete(&tid);
		return 0;
	}
#ifndef HAVE_FD_TABLE
	{
		struct fd_key key = {};
		__u8 one = 1;

		/* the copy is one too: a later dup of stdio onto stdio */
		key.tgid = bpf_get_current_pid_tgid() >> 32;
		key.fd = (__s32)ret;
		inet_fds.update(&key, &one);
	}
#endif
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		dup_pending.delete(&tid);
		return 0;
	}
	fill_header(&r->hdr, RECORD_FD_DUP);
	r->oldfd = pending->oldfd;
	r->newfd = (__s32)ret;
	r->via = pending->via;
	r->_pad = 0;
	process_events.ringbuf_submit(r, judge_now_flags());
	dup_pending.delete(&tid);
	return 0;
}

int rgs_dup(struct tracepoint__syscalls__sys_enter_dup *args)
{
	return dup_enter(args->fildes, 0, FD_VIA_DUP); /* lowest free fd: known at exit */
}

int rgs_dup_ret(struct tracepoint__syscalls__sys_exit_dup *args)
{
	return dup_exit(args->ret);
}

#ifdef HAVE_DUP2
int rgs_dup2(struct tracepoint__syscalls__sys_enter_dup2 *args)
{
	return dup_enter(args->oldfd, args->newfd, FD_VIA_DUP2);
}

int rgs_dup2_ret(struct tracepoint__syscalls__sys_exit_dup2 *args)
{
	return dup_exit(args->ret);
}
#endif

int rgs_dup3(struct tracepoint__syscalls__sys_enter_dup3 *args)
{
	return dup_enter(args->oldfd, args->newfd, FD_VIA_DUP3);
}

int rgs_dup3_ret(struct tracepoint__syscalls__sys_exit_dup3 *args)
{
	return dup_exit(args->ret);
}

int rgs_fcntl(struct tracepoint__syscalls__sys_enter_fcntl *args)
{
	/* F_DUPFD 0, F_DUPFD_CLOEXEC 1030: the lowest free fd >= arg */
	if (args->cmd != 0 && args->cmd != 1030)
		return 0;
	return dup_enter(args->fd, args->arg, FD_VIA_FCNTL);
}

int rgs_fcntl_ret(struct tracepoint__syscalls__sys_exit_fcntl *args)
{
	return dup_exit(args->ret);
}

int rgs_rename(struct tracepoint__task__task_rename *args)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct rename_record *r;

	if (args->pid != (pid_t)(pid_tgid >> 32) || tid != (pid_tgid >> 32))
		return 0; /* a thread's name, or another task's */
	if (exec_pending.lookup(&tid))
		return 0; /* exec naming the process after its file */
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		return 0;
	}
	fill_header(&r->hdr, RECORD_RENAME);
	__builtin_memset(r->newcomm, 0, sizeof(r->newcomm)); /* wake_names keys are zero-padded */
	bpf_probe_read_kernel_str(r->newcomm, sizeof(r->newcomm), args->newcomm);
	/* renamed to a name the rules know: wake user space now; any other
	 * rename (an argv rewrite) is judged at the next drain, within 10 ms */
	process_events.ringbuf_submit(r, wanted_flags(name_wanted(r->newcomm)));
	return 0;
}

/* The status the process exited with; -1 when killed by a signal. Where the
 * running kernel's BTF names task_struct.exit_code (HAVE_TASK_EXIT_CODE), it
 * is read there: do_exit() sets it before sched_process_exit, as wait()
 * would see it. Else exit_group(2)'s argument is kept per process until its
 * exit (one more traced syscall, one more map). */
#ifdef HAVE_TASK_EXIT_CODE
static __always_inline __s32 exit_status(__u32 tgid)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	int code = 0;

	if (RG_READ(code, task, RG_OFF_TASK_EXIT_CODE) || (code & 0x7f))
		return -1; /* unreadable, or a signal's number */
	return (code >> 8) & 0xff;
}
#else
int rgs_exit_group(struct tracepoint__syscalls__sys_enter_exit_group *args)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__s32 code = args->error_code & 0xff;

	exit_codes.update(&tgid, &code);
	return 0;
}

static __always_inline __s32 exit_status(__u32 tgid)
{
	__s32 *code = exit_codes.lookup(&tgid);
	__s32 status = code ? *code : -1;

	exit_codes.delete(&tgid);
	return status;
}
#endif

int rgs_exit(struct tracepoint__sched__sched_process_exit *args)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 tgid = pid_tgid >> 32;
	struct exit_record *r;
	struct proc_entry *e;
	__s32 exit_code;
	int send;

	/* per-thread state of the other families */
	exec_pending.delete(&tid);
	exec_retry.delete(&tid);
	connect_pending.delete(&tid);
	send_pending.delete(&tid);
	gpu_pending.delete(&tid);
#ifndef HAVE_FD_TABLE
	socket_pending.delete(&tid);
#endif
	dup_pending.delete(&tid);

#ifdef HAVE_GROUP_DEAD
	if (!args->group_dead)
		return 0;
#else
	if (tid != tgid)
		return 0;
#endif
	exit_code = exit_status(tgid);
	/* sent when user space holds the process: it read it (held_pids, or
	 * no entry: it predates the sensor) or was sent its exec */
	e = proc_live.lookup(&tgid);
	send = !e || (e->flags & PROC_HELD) || held_pids.lookup(&tgid) || !exec_filter_on();
	held_pids.delete(&tgid);
	if (e) {
		e->exit_ns = bpf_ktime_get_boot_ns();
		e->exit_code = exit_code;
		e->flags |= PROC_EXITED;
		proc_exited.update(&tgid, e);
		count_table(TABLE_EXITED_INSERTS);
		proc_live.delete(&tgid);
		count_table(TABLE_LIVE_DELETES);
	}
	if (!send) {
		count_table(TABLE_EXITS_UNSENT);
		return 0;
	}
	r = process_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_PROCESS);
		return 0;
	}
	fill_header(&r->hdr, RECORD_EXIT);
	r->exit_code = exit_code;
	r->_pad = 0;
	process_events.ringbuf_submit(r, lifecycle_flags());
	return 0;
}
