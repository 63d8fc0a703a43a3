-- 2000 accounts with ids 1..2000 and deterministic names, emails and birthdates.
INSERT INTO accounts (account_id, name, email, birthdate)
SELECT
    i,
    first_names[1 + (i * 7) % 16] || ' ' || last_names[1 + (i * 13) % 16],
    lower(first_names[1 + (i * 7) % 16] || '.' || last_names[1 + (i * 13) % 16]) || '.' || i || '@example.com',
    date '1950-01-01' + (i * 7919) % 20000
FROM generate_series(1, 2000) AS i,
    (SELECT
        ARRAY['Ada', 'Bruno', 'Carla', 'Dmitri', 'Elena', 'Farid', 'Greta', 'Hugo',
              'Ines', 'Jonas', 'Kira', 'Luis', 'Marta', 'Nils', 'Olga', 'Pablo'] AS first_names,
        ARRAY['Alvarez', 'Berg', 'Costa', 'Dubois', 'Eriksen', 'Fischer', 'Garcia', 'Horvat',
              'Ivanova', 'Jensen', 'Kowalski', 'Lopez', 'Moreau', 'Novak', 'Okafor', 'Petrov'] AS last_names
    ) AS names
ON CONFLICT (account_id) DO NOTHING;

SELECT setval(pg_get_serial_sequence('accounts', 'account_id'), (SELECT max(account_id) FROM accounts));
