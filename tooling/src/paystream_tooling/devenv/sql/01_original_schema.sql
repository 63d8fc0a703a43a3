-- The retailer's schema, exactly as its docker-compose init files create it.
CREATE TABLE IF NOT EXISTS accounts (
    account_id serial PRIMARY KEY,
    name varchar(150),
    email varchar(100) UNIQUE NOT NULL,
    birthdate date,
    last_payment_date timestamp,
    created_on timestamp DEFAULT now()
);

CREATE TABLE IF NOT EXISTS payments (
    payment_id varchar(100) PRIMARY KEY,
    account_id integer REFERENCES accounts (account_id),
    payment_type varchar(150) NOT NULL,
    credit_card varchar(100),
    amount numeric NOT NULL,
    created_on timestamp DEFAULT now()
);
