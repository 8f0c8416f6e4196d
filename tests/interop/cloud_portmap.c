/* The course's way in: clnt_create(host, CLOUD_PROG, CLOUD_VERS, "tcp")
 * finds the server through the portmapper (cloud-server --register), then
 * asks STATUS of a ticket that was never issued.
 * Usage: cloud_portmap HOST TICKET. Prints one line; exit 0 on the
 * expected CLOUD_NO_SUCH_TICKET answer. */
#include <stdio.h>
#include <stdlib.h>
#include "cloud.h"

int
main(int argc, char **argv)
{
	CLIENT *clnt;
	status_res *res;
	u_int ticket;

	if (argc != 3) {
		fprintf(stderr, "usage: %s HOST TICKET\n", argv[0]);
		return 2;
	}
	clnt = clnt_create(argv[1], CLOUD_PROG, CLOUD_VERS, "tcp");
	if (clnt == NULL) {
		clnt_pcreateerror(argv[1]);
		return 1;
	}
	ticket = (u_int)strtoul(argv[2], NULL, 10);
	res = status_1(&ticket, clnt);
	if (res == NULL) {
		clnt_perror(clnt, "STATUS");
		return 1;
	}
	printf("clnt_create found the server; STATUS %u: stat %d (%s)\n", ticket, (int)res->stat,
	    res->stat == CLOUD_OK ? "ok" : res->status_res_u.message);
	clnt_destroy(clnt);
	return res->stat == CLOUD_NO_SUCH_TICKET ? 0 : 1;
}
