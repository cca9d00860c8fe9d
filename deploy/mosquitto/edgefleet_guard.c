/*
 * edgefleet_guard: a mosquitto 2.0 plugin that closes two gaps the acl_file cannot.
 *
 * 1. mosquitto 2.0's acl_file never checks subscriptions (security_default.c answers every SUBSCRIBE
 *    with success; reads are checked only at delivery). A device that subscribes to the ingest's shared
 *    subscription ($share/ingest/...) joins the group, is dealt its round-robin share and then loses
 *    each message at the read check, after the publisher got its PUBACK. This plugin refuses any
 *    $share/... subscription to identities that are not services.
 * 2. A device certificate is valid for one client id: its own name. The device listener sets
 *    use_username_as_clientid, so a device cannot take over another client's session there; if a
 *    device identity reaches a listener without that setting (the services' listener), every publish,
 *    subscribe and delivery is refused to it unless its client id is its name.
 *
 * Everything else is deferred to the acl_file. Configure (see deploy/mosquitto/edgefleet.conf):
 *     plugin /usr/lib/mosquitto/edgefleet_guard.so
 *     plugin_opt_services trainer monitor
 * Build: make broker-plugin (needs gcc and Debian's mosquitto-dev).
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_SERVICES 32

static mosquitto_plugin_id_t *plugin_id = NULL;
static char *services_text = NULL;
static const char *services[MAX_SERVICES];
static int service_count = 0;

static bool is_service(const char *username)
{
	for(int i = 0; i < service_count; i++){
		if(!strcmp(services[i], username)) return true;
	}
	return false;
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username = mosquitto_client_username(ed->client);
	const char *id = mosquitto_client_id(ed->client);
	(void)event;
	(void)userdata;

	if(!username || !id) return MOSQ_ERR_ACL_DENIED;
	if(is_service(username)) return MOSQ_ERR_PLUGIN_DEFER;
	if(strcmp(id, username)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"edgefleet_guard: denied %s: client id '%s' is not its certificate name", username, id);
		return MOSQ_ERR_ACL_DENIED;
	}
	if((ed->access == MOSQ_ACL_SUBSCRIBE || ed->access == MOSQ_ACL_UNSUBSCRIBE)
			&& !strncmp(ed->topic, "$share/", 7)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"edgefleet_guard: denied %s the shared subscription %s", username, ed->topic);
		return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	plugin_id = identifier;
	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "services")){
			services_text = strdup(opts[i].value);
		}
	}
	if(services_text){
		for(char *tok = strtok(services_text, " ,"); tok && service_count < MAX_SERVICES;
				tok = strtok(NULL, " ,")){
			services[service_count++] = tok;
		}
	}
	if(service_count == 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "edgefleet_guard: plugin_opt_services (service identities) is required");
		return MOSQ_ERR_INVAL;
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	(void)user_data;
	(void)opts;
	(void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
	free(services_text);
	services_text = NULL;
	service_count = 0;
	return MOSQ_ERR_SUCCESS;
}
