/* Opens of /dev/nvidia*: a process creating a GPU context. Part of sensor.c.
 *
 * Every open on the host passes through here, so the entry program reads
 * only the first GPU_PATH_PREFIX_LEN bytes of the path and stops unless
 * they are "/dev/nvidia". A match (or a path not yet paged in, which the
 * kernel is about to fault in) is kept per thread until the syscall returns;
 * only successful opens are reported, with the fd. The path is the one
 * passed to open, compared literally: relative paths, symlinks and
 * io_uring opens are not seen here (NVML polling is the backstop).
 */

static __always_inline int has_gpu_prefix(const char *p)
{
	const char want[GPU_PATH_PREFIX_LEN + 1] = GPU_PATH_PREFIX;

	for (int i = 0; i < GPU_PATH_PREFIX_LEN; i++) {
		if (p[i] != want[i])
			return 0;
	}
	return 1;
}

static __always_inline int gpu_open_enter(const char *path, __u32 flags)
{
	char prefix[GPU_PATH_PREFIX_LEN];
	struct gpu_pending p = {};
	__u32 tid;

	if (!path)
		return 0;
	if (bpf_probe_read_user(prefix, sizeof(prefix), path) == 0) {
		if (!has_gpu_prefix(prefix))
			return 0;
		/* read now: the caller could change it before the syscall returns */
		if (bpf_probe_read_user_str(p.path, sizeof(p.path), path) > 0)
			p.resolved = 1;
	}
	if (current_is_ignored())
		return 0;
	tid = current_tid();
	p.path_ptr = (__u64)path;
	p.flags = flags;
	if (gpu_pending.update(&tid, &p) < 0)
		count_lost(LOST_NETWORK);
	return 0;
}

static __always_inline int gpu_open_exit(long ret)
{
	__u32 tid = current_tid();
	struct gpu_pending *p = gpu_pending.lookup(&tid);
	struct gpu_open_record *r;

	if (!p)
		return 0;
	if (ret < 0)
		goto done;
	r = network_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_NETWORK);
		goto done;
	}
	if (p->resolved) {
		__builtin_memcpy(r->path, p->path, sizeof(r->path));
	} else if (bpf_probe_read_user_str(r->path, sizeof(r->path), (const char *)p->path_ptr) <= 0 ||
		   !has_gpu_prefix(r->path)) {
		network_events.ringbuf_discard(r, 0);
		goto done;
	}
	fill_header(&r->hdr, RECORD_GPU_OPEN);
	r->result = ret;
	r->flags = p->flags;
	network_events.ringbuf_submit(r, 0);
done:
	gpu_pending.delete(&tid);
	return 0;
}

int rgs_openat(struct tracepoint__syscalls__sys_enter_openat *args)
{
	return gpu_open_enter(args->filename, args->flags);
}

int rgs_openat_ret(struct tracepoint__syscalls__sys_exit_openat *args)
{
	return gpu_open_exit(args->ret);
}

#ifdef HAVE_OPEN
int rgs_open(struct tracepoint__syscalls__sys_enter_open *args)
{
	return gpu_open_enter(args->filename, args->flags);
}

int rgs_open_ret(struct tracepoint__syscalls__sys_exit_open *args)
{
	return gpu_open_exit(args->ret);
}
#endif

#ifdef HAVE_OPENAT2
int rgs_openat2(struct tracepoint__syscalls__sys_enter_openat2 *args)
{
	__u64 flags = 0;

	/* struct open_how (uapi) starts with __u64 flags */
	if (args->how)
		bpf_probe_read_user(&flags, sizeof(flags), args->how);
	return gpu_open_enter(args->filename, (__u32)flags);
}

int rgs_openat2_ret(struct tracepoint__syscalls__sys_exit_openat2 *args)
{
	return gpu_open_exit(args->ret);
}
#endif
